// Driver of the weight-only linears (int8_linear.cpp, float_weight_linear.cpp, the decoder step,
// the LM head screen): y = x @ dequant(weight)^T for fp32 x and int8 / bf16 / fp16 / fp32 weights,
// parallel over output columns.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "kernels.h"
#include "parallel.h"

namespace umt5_fast {

// `buffer` grown to hold `size` floats from a 64-byte boundary, which it returns: the panel
// kernels' vector loads then never straddle two cache lines (unaligned panels cost ~15%).
inline float* cache_line_aligned(std::vector<float>& buffer, int64_t size) {
  constexpr int64_t kLineFloats = 16;
  if (static_cast<int64_t>(buffer.size()) < size + kLineFloats) buffer.resize(size + kLineFloats);
  const auto address = reinterpret_cast<uintptr_t>(buffer.data());
  return buffer.data() + ((64 - address % 64) % 64) / sizeof(float);
}

// Many rows: kernels::panel_linear over chunks of columns, each thread with its own packing and
// partial-sum buffers (kept between calls: fresh ones cost page faults on every call). Chunks
// shrink for narrow weights so that every thread gets two.
template <typename WeightT>
void run_panel_linear(const kernels::LinearProblem<WeightT>& problem, int num_threads) {
  void (*linear)(const kernels::LinearProblem<WeightT>&, int64_t, int64_t, float*, float*) = nullptr;
  UMT5_DISPATCH_ISA(ISA, linear = &kernels::panel_linear<ISA, WeightT>);
  const int64_t N = problem.out_features;
  const int64_t per_thread = (N + 2 * num_threads - 1) / (2 * std::max(num_threads, 1));
  const int64_t chunk = std::clamp<int64_t>((per_thread + 31) / 32 * 32, 32, kernels::kPanelColumns);
  const int64_t chunks = (N + chunk - 1) / chunk;
  parallel_for_ranges(chunks, 1, num_threads, [&](int64_t begin, int64_t end) {
    thread_local std::vector<float> packed, partial;
    float* packed_at = cache_line_aligned(packed, kernels::kPanelColumns * kernels::kPanelDepth);
    float* partial_at = problem.in_features > kernels::kPanelDepth
                            ? cache_line_aligned(partial, problem.rows * kernels::kPanelColumns)
                            : nullptr;
    for (int64_t c = begin; c < end; ++c)
      linear(problem, c * chunk, std::min(N, (c + 1) * chunk), packed_at, partial_at);
  });
}

template <typename WeightT>
void run_weight_only_linear(const kernels::LinearProblem<WeightT>& problem, int num_threads) {
  if (problem.rows >= kernels::kPanelMinRows) {
    run_panel_linear(problem, num_threads);
    return;
  }
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
