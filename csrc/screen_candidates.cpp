// The C++ parts of umt5_fast/lm_head_screen.py: its per-row norms (at build), and the whole greedy
// pick per call (screen_argmax): the integer product, the thresholding, the candidates' exact logits.
// Given approximate logits a[r][c] whose error is at most
//   margin[r][c] = norm[r] * bound[c] + norm2[r] * bound2[c]
// (the input's size times the weight's error terms, plus the input's own quantisation error times
// the weight row's size), the thresholding finds every column that may hold row r's largest logit
// for some r, the candidates:
//   best_lower[r] = max_c (a[r][c] - margin[r][c]),
//   c such that any_r (a[r][c] + margin[r][c] >= best_lower[r] - slack * (|best_lower[r]| + floor))
// (slack > 0 where the exact logits are rounded after: rows that round up to the maximum count;
// floor: the magnitude below which the rounded type's spacing stops shrinking, its subnormals).
// One streaming pass over a, then the few chunks of columns that hold candidates; in torch the
// same arithmetic made 5 passes and, at 16 rows of a 256384-entry vocabulary, took longer (19 ms)
// than the int8 product it screens (14 ms).
// The products and sums round once each (no FMA contraction: -ffp-contract=off); the bound has
// terms for those roundings. a holds no NaN (the caller checks its inputs are finite).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <stdexcept>
#include <vector>

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "bf16.h"
#include "fp16.h"
#include "ops.h"
#include "parallel.h"
#include "weight_only_linear.h"
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


// Columns c (ascending) that may hold one of some row's `rank` largest logits (rank <= chunks):
// a + margin >= best_lower - slack, best_lower the rank-th largest lower bound of a chunk's maximum.
// Pass 1: per row and chunk the largest lower and upper bounds. Pass 2 reads only the chunks whose
// largest upper bound reaches a row's threshold (a few, where the screen decides): the same sums,
// so a chunk holds a candidate iff its maximum reaches.
std::vector<int64_t> find_candidates(const float* a, const std::vector<float>& norm, const float* bound,
                                     const std::vector<float>& norm2, const float* bound2, int64_t rows,
                                     int64_t cols, int64_t rank, float slack, float slack_floor, int num_threads) {
  const auto margin_of_row = [&](int64_t r) { return Margin{bound, bound2, norm[r], norm2[r]}; };
  const int64_t chunks = (cols + kChunk - 1) / kChunk, grain = 32;
  std::vector<float> lower(static_cast<size_t>(rows) * chunks), upper(lower.size());
  parallel_for_ranges(chunks, grain, num_threads, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k)
      for (int64_t r = 0; r < rows; ++r)
        margin_maxima(a + r * cols, margin_of_row(r), k * kChunk, std::min(cols, (k + 1) * kChunk),
                      &lower[r * chunks + k], &upper[r * chunks + k]);
  });
  // The rank-th largest of a row's chunk maxima: `rank` columns (one per chunk) have lower bounds at
  // least this, so the rank-th largest logit does too (rank 1: the best lower bound).
  std::vector<float> best_lower(rows), row_lower(chunks);
  for (int64_t r = 0; r < rows; ++r) {
    std::copy_n(lower.begin() + r * chunks, chunks, row_lower.begin());
    std::nth_element(row_lower.begin(), row_lower.begin() + (rank - 1), row_lower.end(), std::greater<float>());
    const float best = row_lower[rank - 1];
    best_lower[r] = slack > 0 ? best - slack * (std::fabs(best) + slack_floor) : best;
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
  std::vector<int64_t> candidates;
  for (const auto& in_chunk : found) candidates.insert(candidates.end(), in_chunk.begin(), in_chunk.end());
  return candidates;
}

// The exact logits of the candidate rows of the head, as ops.cpu.kernel_linear computes them on
// the whole head (the weight-only kernels' sums for one row and column depend on no other column,
// so the gathered rows give the same bits): [rows, candidates].
template <typename WeightT>
std::vector<float> candidate_logits(const float* x, int64_t rows, int64_t cols, const WeightT* head,
                                    const float* head_scale, const std::vector<int64_t>& candidates,
                                    int num_threads) {
  const int64_t n = static_cast<int64_t>(candidates.size());
  std::vector<WeightT> gathered(n * cols);
  std::vector<float> scale(head_scale ? n : 0), logits(rows * n);
  for (int64_t i = 0; i < n; ++i) {
    std::copy_n(head + candidates[i] * cols, cols, gathered.data() + i * cols);
    if (head_scale) scale[i] = head_scale[candidates[i]];
  }
  run_weight_only_linear<WeightT>({x, gathered.data(), head_scale ? scale.data() : nullptr, nullptr,
                                   logits.data(), rows, cols, n}, num_threads);
  return logits;
}

enum HeadKind { kFp32Head = 0, kBf16Head = 1, kInt8Head = 2, kFp16Head = 3 };

struct ScreenCall {
  const float* x;  // [rows, cols] fp32 (a bf16 / fp16 model's x widened)
  int64_t rows, cols;
  const int8_t* screen_qweight;  // the int8 rows [vocab, cols] and their scales
  const float* screen_scale;
  int64_t vocab;
  const float *bound, *bound2;  // LMHeadScreen.bound, .input_error_bound
  double largest_norm, min_norm;
  int head_kind;  // the head the exact logits come from: kFp32Head, kBf16Head, kInt8Head (+ head_scale), kFp16Head
  const void* head;
  const float* head_scale;
  int logits_kind;  // kFp32Head: logits as summed; kBf16Head / kFp16Head: rounded to bf16 / fp16 (slack > 0 then)
  float slack, slack_floor;
  const std::vector<int64_t>& forbidden;
  int64_t max_candidates;
  float* approx;  // [rows, vocab] scratch: the integer product
  int64_t* out;   // [rows] the picks (argmax), or null
  int64_t rank;   // candidates for the `rank` largest logits of each row (1: the argmax)
  int64_t* candidate_ids;   // [max_candidates] the candidates' ids, or null
  float* candidate_logits;  // [rows, max_candidates] their exact logits (row stride max_candidates), or null
  int num_threads;
};

// LMHeadScreen.argmax in one call (see lm_head_screen.py for the bound): Python would run ~10
// small torch ops between the kernels, each ~0.1-0.3 ms right after the head's product has swept
// the caches (3-5 us when warm): ~1.4 ms of a 10 ms decode step at bs=1.
int64_t screen_argmax(const ScreenCall& s) {
  std::vector<float> norm(s.rows), norm2(s.rows);
  for (int64_t r = 0; r < s.rows; ++r) {
    double sum = 0;
    for (int64_t c = 0; c < s.cols; ++c) sum += static_cast<double>(s.x[r * s.cols + c]) * s.x[r * s.cols + c];
    const double n = std::sqrt(sum);
    // inf / NaN input, logits near fp32 overflow or underflow: the float path decides
    if (!std::isfinite(n) || n * s.largest_norm > 1e30 || n < s.min_norm) return -1;
    norm[r] = static_cast<float>(n);
  }
  float* approx = s.approx;  // finite: inputs finite, far from overflow
  run_w8a8_linear(s.x, s.screen_qweight, /*row_layout=*/true, s.screen_scale, nullptr, approx, s.rows, s.cols,
                  s.vocab, s.num_threads);
  for (const int64_t id : s.forbidden)
    for (int64_t r = 0; r < s.rows; ++r) approx[r * s.vocab + id] = -std::numeric_limits<float>::infinity();
  std::vector<double> input_error(s.rows);
  w8a8_quantisation_error(s.x, s.rows, s.cols, input_error.data(), s.num_threads);
  for (int64_t r = 0; r < s.rows; ++r) norm2[r] = static_cast<float>(input_error[r]);
  if (s.rank > (s.vocab + kChunk - 1) / kChunk) return -1;  // more than one per chunk: the float path
  const std::vector<int64_t> candidates = find_candidates(approx, norm, s.bound, norm2, s.bound2, s.rows,
                                                          s.vocab, s.rank, s.slack, s.slack_floor, s.num_threads);
  const int64_t n = static_cast<int64_t>(candidates.size());
  if (n > s.max_candidates || n < s.rank) return -1;
  std::vector<float> logits;
  switch (s.head_kind) {
    case kFp32Head:
      logits = candidate_logits(s.x, s.rows, s.cols, static_cast<const float*>(s.head), nullptr, candidates,
                                s.num_threads);
      break;
    case kBf16Head:
      logits = candidate_logits(s.x, s.rows, s.cols, static_cast<const uint16_t*>(s.head), nullptr, candidates,
                                s.num_threads);
      break;
    case kFp16Head:
      logits = candidate_logits(s.x, s.rows, s.cols, static_cast<const Fp16*>(s.head), nullptr, candidates,
                                s.num_threads);
      break;
    default:
      logits = candidate_logits(s.x, s.rows, s.cols, static_cast<const int8_t*>(s.head), s.head_scale, candidates,
                                s.num_threads);
  }
  if (s.logits_kind == kBf16Head)
    for (float& logit : logits) logit = bf16_to_float(float_to_bf16(logit));
  if (s.logits_kind == kFp16Head)
    for (float& logit : logits) logit = fp16_to_float(float_to_fp16(logit));
  // A logit rounded to +-inf (fp16 overflows past 65504): ids outside the candidates may round to
  // the same inf (the first of them the pick, or among the `rank` largest): the float path decides.
  for (int64_t r = 0; s.out && r < s.rows; ++r) {
    const float* row = logits.data() + r * n;
    const float* best = std::max_element(row, row + n);  // the first of equal maxima
    if (!std::isfinite(*best)) return -1;
    s.out[r] = candidates[best - row];
  }
  if (s.candidate_ids) {
    if (!std::all_of(logits.begin(), logits.end(), [](float v) { return std::isfinite(v); })) return -1;
    std::copy(candidates.begin(), candidates.end(), s.candidate_ids);
    for (int64_t r = 0; r < s.rows; ++r)
      std::copy_n(logits.data() + r * n, n, s.candidate_logits + r * s.max_candidates);
  }
  return n;
}
}  // namespace

void register_screen_candidates(py::module_& m) {
  m.def("screen_row_norms",
        [](uintptr_t weight, int weight_kind, uintptr_t qweight, uintptr_t scale, int64_t rows, int64_t cols,
           uintptr_t out, int num_threads) {
          if (weight_kind != kFp32Head && weight_kind != kBf16Head && weight_kind != kFp16Head)
            throw std::invalid_argument("screen_row_norms: weight_kind must be 0 (fp32), 1 (bf16) or 3 (fp16)");
          const auto* q = reinterpret_cast<const int8_t*>(qweight);
          const auto* s = reinterpret_cast<const float*>(scale);
          auto* norms = reinterpret_cast<double*>(out);
          py::gil_scoped_release no_gil;
          if (weight_kind == kBf16Head)
            row_norms(reinterpret_cast<const uint16_t*>(weight), q, s, rows, cols, norms, num_threads);
          else if (weight_kind == kFp16Head)
            row_norms(reinterpret_cast<const Fp16*>(weight), q, s, rows, cols, norms, num_threads);
          else
            row_norms(reinterpret_cast<const float*>(weight), q, s, rows, cols, norms, num_threads);
        },
        py::kw_only(), py::arg("weight"), py::arg("weight_kind"), py::arg("qweight"), py::arg("scale"),
        py::arg("rows"), py::arg("cols"), py::arg("out"), py::arg("num_threads"),
        "out[r] = (||w_r - s_r q_r||, ||s_r q_r||, ||w_r||) in fp64 for a weight [rows, cols] of "
        "weight_kind 0 (fp32), 1 (bf16) or 3 (fp16) (weight = 0: w = s q), its int8 rows q and "
        "scales s (fp64 out [rows, 3]).");

  m.def("screen_argmax",
        [](uintptr_t x, int64_t rows, int64_t cols, uintptr_t screen_qweight, uintptr_t screen_scale,
           int64_t vocab, uintptr_t bound, uintptr_t bound2, double largest_norm, double min_norm,
           int head_kind, uintptr_t head, uintptr_t head_scale, int logits_kind, float slack, float slack_floor,
           const std::vector<int64_t>& forbidden, int64_t max_candidates, uintptr_t approx, uintptr_t out,
           int64_t rank, uintptr_t candidate_ids, uintptr_t candidate_logits, int num_threads) {
          if (cols < 1 || cols > 65536 || head_kind < kFp32Head || head_kind > kFp16Head ||
              (logits_kind != kFp32Head && logits_kind != kBf16Head && logits_kind != kFp16Head))
            throw std::invalid_argument("screen_argmax: cols must be in [1, 65536], head_kind 0-3, logits_kind 0, 1 or 3");
          for (const int64_t id : forbidden)
            if (id < 0 || id >= vocab) throw std::invalid_argument("screen_argmax: forbidden id out of range");
          if (rank < 1 || (candidate_ids == 0) != (candidate_logits == 0) || (out == 0 && candidate_ids == 0))
            throw std::invalid_argument("screen_argmax: rank must be >= 1, with out and / or both candidate outputs");
          const ScreenCall call{reinterpret_cast<const float*>(x), rows, cols,
                                reinterpret_cast<const int8_t*>(screen_qweight),
                                reinterpret_cast<const float*>(screen_scale), vocab,
                                reinterpret_cast<const float*>(bound), reinterpret_cast<const float*>(bound2),
                                largest_norm, min_norm, head_kind, reinterpret_cast<const void*>(head),
                                reinterpret_cast<const float*>(head_scale), logits_kind, slack, slack_floor, forbidden,
                                max_candidates, reinterpret_cast<float*>(approx), reinterpret_cast<int64_t*>(out),
                                rank, reinterpret_cast<int64_t*>(candidate_ids),
                                reinterpret_cast<float*>(candidate_logits), num_threads};
          py::gil_scoped_release no_gil;
          return screen_argmax(call);
        },
        py::kw_only(), py::arg("x"), py::arg("rows"), py::arg("cols"), py::arg("screen_qweight"),
        py::arg("screen_scale"), py::arg("vocab"), py::arg("bound"), py::arg("bound2"),
        py::arg("largest_norm"), py::arg("min_norm"), py::arg("head_kind"), py::arg("head"),
        py::arg("head_scale"), py::arg("logits_kind"), py::arg("slack"), py::arg("slack_floor"), py::arg("forbidden"),
        py::arg("max_candidates"), py::arg("approx"), py::arg("out"), py::arg("rank") = 1,
        py::arg("candidate_ids") = 0, py::arg("candidate_logits") = 0, py::arg("num_threads"),
        "LMHeadScreen.argmax's pick for fp32 x [rows, cols] (see screen_argmax in "
        "screen_candidates.cpp): out[r] (int64; 0: not wanted) = the first largest logit's id of row r, ids "
        "in `forbidden` excluded (approx: fp32 scratch [rows, vocab]); with `rank`, the candidates for "
        "each row's `rank` largest logits go to candidate_ids [max_candidates] (int64) and their exact "
        "logits to candidate_logits [rows, max_candidates]; returns the number of candidates, or -1 "
        "where the screen cannot decide.");
}

}  // namespace umt5_fast
