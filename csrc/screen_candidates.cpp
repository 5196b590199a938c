// The C++ parts of umt5_fast/lm_head_screen.py: its per-row norms (at build), and its thresholding.
// Given approximate logits a[r][c] whose error is at most norm[r] * bound[c], the thresholding flags
// every column that may hold row r's largest logit for some r:
//   best_lower[r] = max_c (a[r][c] - norm[r] * bound[c]),
//   flag[c] = any_r (a[r][c] + norm[r] * bound[c] >= best_lower[r] - slack * |best_lower[r]|)
// (slack > 0 where the exact logits are rounded after: rows that round up to the maximum count).
// Two streaming passes over a; in torch the same arithmetic made 5 passes and, at 16 rows of a
// 256384-entry vocabulary, took longer (19 ms) than the int8 product it screens (14 ms).
// The products and sums round once each (no FMA contraction: -ffp-contract=off); the bound has
// terms for those roundings. a holds no NaN (the caller checks its inputs are finite).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include <pybind11/pybind11.h>

#include "parallel.h"
#include "weight_types.h"

namespace py = pybind11;

namespace umt5_fast {
namespace {

constexpr int kLanes = 16;  // independent maxima: the compiler keeps them in vector registers

float lower_bound_max(const float* a, float norm, const float* bound, int64_t begin, int64_t end) {
  float best[kLanes];
  std::fill(best, best + kLanes, -std::numeric_limits<float>::infinity());
  int64_t c = begin;
  for (; c + kLanes <= end; c += kLanes)
    for (int l = 0; l < kLanes; ++l) best[l] = std::max(best[l], a[c + l] - norm * bound[c + l]);
  for (; c < end; ++c) best[0] = std::max(best[0], a[c] - norm * bound[c]);
  return *std::max_element(best, best + kLanes);
}

// Per row of a float weight w and its int8 screen s * q: ||w - s q||, ||s q||, ||w|| in fp64 (every
// product and the difference exact or within 2^-53, far below the bound's other terms), one pass.
template <typename WeightT>
void row_norms(const WeightT* w, const int8_t* q, const float* scale, int64_t rows, int64_t cols,
               double* out, int num_threads) {
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(cols, 1));
  parallel_for_ranges(rows, grain, num_threads, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const double s = scale[r];
      double error = 0, screened = 0, exact = 0;
      for (int64_t c = 0; c < cols; ++c) {
        const double v = widen_weight(w[r * cols + c]), sq = s * q[r * cols + c];
        error += (v - sq) * (v - sq);
        screened += sq * sq;
        exact += v * v;
      }
      out[3 * r] = std::sqrt(error);
      out[3 * r + 1] = std::sqrt(screened);
      out[3 * r + 2] = std::sqrt(exact);
    }
  });
}

}  // namespace

void register_screen_candidates(py::module_& m) {
  m.def("screen_row_norms",
        [](uintptr_t weight, bool bf16, uintptr_t qweight, uintptr_t scale, int64_t rows, int64_t cols,
           uintptr_t out, int num_threads) {
          const auto* q = reinterpret_cast<const int8_t*>(qweight);
          const auto* s = reinterpret_cast<const float*>(scale);
          auto* norms = reinterpret_cast<double*>(out);
          py::gil_scoped_release no_gil;
          if (bf16)
            row_norms(reinterpret_cast<const uint16_t*>(weight), q, s, rows, cols, norms, num_threads);
          else
            row_norms(reinterpret_cast<const float*>(weight), q, s, rows, cols, norms, num_threads);
        },
        py::kw_only(), py::arg("weight"), py::arg("bf16"), py::arg("qweight"), py::arg("scale"),
        py::arg("rows"), py::arg("cols"), py::arg("out"), py::arg("num_threads"),
        "out[r] = (||w_r - s_r q_r||, ||s_r q_r||, ||w_r||) in fp64 for an fp32 / bf16 weight [rows, "
        "cols], its int8 rows q and scales s (fp64 out [rows, 3]).");

  m.def("screen_candidates",
        [](uintptr_t approx, uintptr_t norm, uintptr_t bound, uintptr_t flags, int64_t rows,
           int64_t cols, float slack, int num_threads) {
          const auto* a = reinterpret_cast<const float*>(approx);
          const auto* row_norm = reinterpret_cast<const float*>(norm);
          const auto* col_bound = reinterpret_cast<const float*>(bound);
          auto* flag = reinterpret_cast<uint8_t*>(flags);
          py::gil_scoped_release no_gil;
          const int64_t grain = 1 << 14;
          const int threads = static_cast<int>(
              std::max<int64_t>(1, std::min<int64_t>(num_threads, cols / grain)));
          std::vector<float> partial(static_cast<size_t>(rows) * threads,
                                     -std::numeric_limits<float>::infinity());
          parallel_for_ranges(threads, 1, threads, [&](int64_t t_begin, int64_t t_end) {
            for (int64_t t = t_begin; t < t_end; ++t)
              for (int64_t r = 0; r < rows; ++r)
                partial[r * threads + t] = lower_bound_max(a + r * cols, row_norm[r], col_bound,
                                                           cols * t / threads,
                                                           cols * (t + 1) / threads);
          });
          std::vector<float> best_lower(rows);
          for (int64_t r = 0; r < rows; ++r) {
            const float best = *std::max_element(partial.begin() + r * threads,
                                                 partial.begin() + (r + 1) * threads);
            // (+1e-30: a bf16 spacing is never 0, also where the best bound is)
            best_lower[r] = slack > 0 ? best - slack * (std::fabs(best) + 1e-30f) : best;
          }
          parallel_for_ranges(cols, grain, num_threads, [&](int64_t begin, int64_t end) {
            std::fill(flag + begin, flag + end, uint8_t{0});
            for (int64_t r = 0; r < rows; ++r) {
              const float* row = a + r * cols;
              const float n = row_norm[r], lower = best_lower[r];
              for (int64_t c = begin; c < end; ++c)
                flag[c] |= static_cast<uint8_t>(row[c] + n * col_bound[c] >= lower);
            }
          });
        },
        py::kw_only(), py::arg("approx"), py::arg("norm"), py::arg("bound"), py::arg("flags"),
        py::arg("rows"), py::arg("cols"), py::arg("slack"), py::arg("num_threads"),
        "flags[c] = 1 where approx[r, c] + norm[r] * bound[c] >= max_c' (approx[r, c'] - norm[r] * "
        "bound[c']) - slack * |that max| for some row r (fp32 [rows, cols] contiguous; uint8 flags [cols]).");
}

}  // namespace umt5_fast
