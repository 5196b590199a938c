// The C++ parts of umt5_fast/lm_head_screen.py: its per-row norms (at build), and its thresholding.
// Given approximate logits a[r][c] whose error is at most
//   margin[r][c] = norm[r] * bound[c] + norm2[r] * bound2[c]
// (the input's size times the weight's error terms, plus the input's own quantisation error times
// the weight row's size), the thresholding finds every column that may hold row r's largest logit
// for some r, the candidates:
//   best_lower[r] = max_c (a[r][c] - margin[r][c]),
//   c such that any_r (a[r][c] + margin[r][c] >= best_lower[r] - slack * |best_lower[r]|)
// (slack > 0 where the exact logits are rounded after: rows that round up to the maximum count).
// One streaming pass over a, then the few chunks of columns that hold candidates; in torch the
// same arithmetic made 5 passes and, at 16 rows of a 256384-entry vocabulary, took longer (19 ms)
// than the int8 product it screens (14 ms).
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

// The error margin of column c for a row with norms (n, n2); one definition for both passes.
struct Margin {
  const float *bound, *bound2;
  float n, n2;
  float operator()(int64_t c) const { return n * bound[c] + n2 * bound2[c]; }
};

// Columns per chunk: the chunk's bounds (4 KiB) stay in L1 while every row passes over it, so the
// bounds are read from memory once per call rather than once per row.
constexpr int64_t kChunk = 512;

// max_c (a[c] - margin(c)) and max_c (a[c] + margin(c)) over [begin, end).
void margin_maxima(const float* a, const Margin& margin, int64_t begin, int64_t end, float* lower, float* upper) {
  float low[kLanes], up[kLanes];
  std::fill(low, low + kLanes, -std::numeric_limits<float>::infinity());
  std::fill(up, up + kLanes, -std::numeric_limits<float>::infinity());
  int64_t c = begin;
  for (; c + kLanes <= end; c += kLanes)
    for (int l = 0; l < kLanes; ++l) {
      const float m = margin(c + l);
      low[l] = std::max(low[l], a[c + l] - m);
      up[l] = std::max(up[l], a[c + l] + m);
    }
  for (; c < end; ++c) {
    const float m = margin(c);
    low[0] = std::max(low[0], a[c] - m);
    up[0] = std::max(up[0], a[c] + m);
  }
  *lower = *std::max_element(low, low + kLanes);
  *upper = *std::max_element(up, up + kLanes);
}

// Per row of a float weight w and its int8 screen s * q: ||w - s q||, ||s q||, ||w|| in fp64 (every
// product and the difference exact or within 2^-53, far below the bound's other terms), one pass.
// A null w stands for w = s q (an int8 head screens itself).
template <typename WeightT>
void row_norms(const WeightT* w, const int8_t* q, const float* scale, int64_t rows, int64_t cols,
               double* out, int num_threads) {
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(cols, 1));
  parallel_for_ranges(rows, grain, num_threads, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const double s = scale[r];
      double error = 0, screened = 0, exact = 0;
      for (int64_t c = 0; c < cols; ++c) {
        const double sq = s * q[r * cols + c], v = w ? widen_weight(w[r * cols + c]) : sq;
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
        "cols] (weight = 0: w = s q), its int8 rows q and scales s (fp64 out [rows, 3]).");

  m.def("screen_candidates",
        [](uintptr_t approx, uintptr_t norm, uintptr_t bound, uintptr_t norm2, uintptr_t bound2,
           uintptr_t out, int64_t capacity, int64_t rows, int64_t cols, float slack, int num_threads) {
          const auto* a = reinterpret_cast<const float*>(approx);
          const auto* row_norm = reinterpret_cast<const float*>(norm);
          const auto* row_norm2 = reinterpret_cast<const float*>(norm2);
          const auto margin_of_row = [&](int64_t r) {
            return Margin{reinterpret_cast<const float*>(bound), reinterpret_cast<const float*>(bound2),
                          row_norm[r], row_norm2[r]};
          };
          auto* ids = reinterpret_cast<int64_t*>(out);
          py::gil_scoped_release no_gil;
          // Pass 1: per row and chunk the largest lower and upper bounds. Pass 2 reads only the
          // chunks whose largest upper bound reaches a row's threshold (a few, where the screen
          // decides): the same sums, so a chunk holds a candidate iff its maximum reaches.
          const int64_t chunks = (cols + kChunk - 1) / kChunk, grain = 32;
          std::vector<float> lower(static_cast<size_t>(rows) * chunks), upper(lower.size());
          parallel_for_ranges(chunks, grain, num_threads, [&](int64_t begin, int64_t end) {
            for (int64_t k = begin; k < end; ++k)
              for (int64_t r = 0; r < rows; ++r)
                margin_maxima(a + r * cols, margin_of_row(r), k * kChunk, std::min(cols, (k + 1) * kChunk),
                              &lower[r * chunks + k], &upper[r * chunks + k]);
          });
          std::vector<float> best_lower(rows);
          for (int64_t r = 0; r < rows; ++r) {
            const float best = *std::max_element(lower.begin() + r * chunks, lower.begin() + (r + 1) * chunks);
            // (+1e-30: a bf16 spacing is never 0, also where the best bound is)
            best_lower[r] = slack > 0 ? best - slack * (std::fabs(best) + 1e-30f) : best;
          }
          std::vector<std::vector<int64_t>> found(chunks);  // each chunk's candidates, ascending
          parallel_for_ranges(chunks, grain, num_threads, [&](int64_t begin, int64_t end) {
            uint8_t reaches[kChunk];
            for (int64_t k = begin; k < end; ++k) {
              const int64_t c0 = k * kChunk, c1 = std::min(cols, (k + 1) * kChunk);
              bool any = false;
              for (int64_t r = 0; r < rows; ++r) {
                if (!(upper[r * chunks + k] >= best_lower[r])) continue;
                if (!any) std::fill(reaches, reaches + kChunk, uint8_t{0});
                any = true;
                const float* row = a + r * cols;
                const Margin margin = margin_of_row(r);
                for (int64_t c = c0; c < c1; ++c)
                  reaches[c - c0] |= static_cast<uint8_t>(row[c] + margin(c) >= best_lower[r]);
              }
              if (any)
                for (int64_t c = c0; c < c1; ++c)
                  if (reaches[c - c0]) found[k].push_back(c);
            }
          });
          int64_t count = 0;
          for (const auto& in_chunk : found)
            for (const int64_t c : in_chunk) {
              if (count < capacity) ids[count] = c;
              ++count;
            }
          return count;
        },
        py::kw_only(), py::arg("approx"), py::arg("norm"), py::arg("bound"), py::arg("norm2"),
        py::arg("bound2"), py::arg("out"), py::arg("capacity"), py::arg("rows"), py::arg("cols"),
        py::arg("slack"), py::arg("num_threads"),
        "The candidates c, ascending, where approx[r, c] + m[r, c] >= max_c' (approx[r, c'] - "
        "m[r, c']) - slack * |that max| for some row r, m[r, c] = norm[r] * bound[c] + norm2[r] * "
        "bound2[c] (fp32 [rows, cols] contiguous): the first `capacity` of them into out (int64), "
        "and their number returned.");
}

}  // namespace umt5_fast
