// Driver of the weight-only linears (int8_linear.cpp, float_weight_linear.cpp, the decoder step,
// the LM head screen): y = x @ dequant(weight)^T for fp32 x and int8 / bf16 / fp16 / fp32 weights,
// parallel over output columns.
#pragma once

#include <algorithm>
#include <cstdint>

#include "kernels.h"
#include "parallel.h"

namespace umt5_fast {

template <typename WeightT>
void run_weight_only_linear(const kernels::LinearProblem<WeightT>& problem, int num_threads) {
  void (*linear)(const kernels::LinearProblem<WeightT>&, int64_t, int64_t) = nullptr;
  UMT5_DISPATCH_ISA(ISA, linear = &kernels::weight_only_linear<ISA, WeightT>);
  const int64_t K = std::max<int64_t>(problem.in_features, 1);
  // Columns whose weight rows fill about 16 KiB (48 KiB for fp32 rows of 512), in multiples of 24
  // so that every block size (8, 6, 4, 3 rows) tiles them: they stay in cache while every x row
  // uses them.
  const int64_t cached_columns =
      std::max<int64_t>(24, (int64_t{16} << 10) / (K * static_cast<int64_t>(sizeof(WeightT))) / 24 * 24);
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / (K * std::max<int64_t>(problem.rows, 1)));
  parallel_for_ranges(problem.out_features, grain, num_threads, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; n += cached_columns)
      linear(problem, n, std::min(n + cached_columns, end));
  });
}

}  // namespace umt5_fast
