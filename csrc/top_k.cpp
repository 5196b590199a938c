// Row-wise top k of fp32 scores (beam search's best k + 1 of each beam over a 256384-entry
// vocabulary): one pass per row against the current k-th best, which most scores do not beat, so
// the rare insertions into the sorted k cost nothing next to the scan. torch.topk sorts partially
// and took 6x amax's time on [64, 256384] scores (24 against 4 ms on an Ice Lake Xeon).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "cpu_isa.h"
#include "kernels.h"
#include "parallel.h"

namespace py = pybind11;

namespace umt5_fast {
namespace {

// The k largest of x[0..cols) into values / indices, largest first (equal values: the lower index
// first). False when the row holds a NaN (torch.topk counts NaN as the largest: the caller decides).
bool top_k_row(const float* x, int64_t cols, int64_t k, float* values, int64_t* indices) {
  // Places score v of index i among the first `held` (sorted) entries, after those >= v; with all k
  // held, the last one drops out.
  auto place = [&](float v, int64_t i, int64_t held) {
    int64_t at = std::min(held, k - 1);
    for (; at > 0 && values[at - 1] < v; --at) {
      values[at] = values[at - 1];
      indices[at] = indices[at - 1];
    }
    values[at] = v;
    indices[at] = i;
  };
  for (int64_t i = 0; i < k; ++i) {
    if (x[i] != x[i]) return false;
    place(x[i], i, i);
  }
  for (int64_t i = k; i < cols; ++i) {
    const float v = x[i];
    if (!(v <= values[k - 1])) {  // greater than the k-th best, or NaN
      if (v != v) return false;
      place(v, i, k);
    }
  }
  return true;
}

// Beam search's step without its [rows, vocab] log-probabilities: the k best of log_softmax(x)
// with the `banned` ids left out (transformers bans them after the log-softmax: they still count
// in its normaliser), each computed as torch's log_softmax does, (x - max) - log(sum(exp(x - max))).
// `held` / `held_indices`: room for k + banned.size() entries. False (outputs undefined) when the
// row holds a NaN or its maximum is infinite: the caller takes torch's path.
bool log_softmax_top_k_row(const float* x, int64_t cols, int64_t k, const std::vector<int64_t>& banned,
                           float* values, int64_t* indices, float* held, int64_t* held_indices) {
  const int64_t kept = k + static_cast<int64_t>(banned.size());
  if (!top_k_row(x, cols, kept, held, held_indices)) return false;
  const float max = held[0];
  if (!std::isfinite(max)) return false;
  float sum = 0.0f;
  UMT5_DISPATCH_ISA(ISA, sum = kernels::exp_sum<ISA>(x, cols, max));
  const float log_sum = std::log(sum);
  int64_t out = 0;
  for (int64_t i = 0; i < kept && out < k; ++i) {
    if (std::find(banned.begin(), banned.end(), held_indices[i]) != banned.end()) continue;
    values[out] = (held[i] - max) - log_sum;
    indices[out++] = held_indices[i];
  }
  return true;
}

// Runs row_ok(r) for every row on the OpenMP team, without the GIL; whether it held for all.
template <class RowOk>
bool every_row(int64_t rows, int num_threads, const RowOk& row_ok) {
  std::vector<char> ok(rows, 1);
  {
    py::gil_scoped_release no_gil;
    parallel_for_ranges(rows, 1, num_threads, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) ok[r] = row_ok(r);
    });
  }
  return std::all_of(ok.begin(), ok.end(), [](char c) { return c != 0; });
}

}  // namespace

void register_top_k(py::module_& m) {
  m.def("top_k_rows",
        [](uintptr_t x, int64_t rows, int64_t cols, int64_t row_stride, int64_t k, uintptr_t values,
           uintptr_t indices, int num_threads) {
          if (k < 1 || k > cols) throw py::value_error("top_k_rows needs 1 <= k <= cols");
          const auto* scores = reinterpret_cast<const float*>(x);
          auto* top_values = reinterpret_cast<float*>(values);
          auto* top_indices = reinterpret_cast<int64_t*>(indices);
          return every_row(rows, num_threads, [&](int64_t r) {
            return top_k_row(scores + r * row_stride, cols, k, top_values + r * k, top_indices + r * k);
          });
        },
        py::kw_only(), py::arg("x"), py::arg("rows"), py::arg("cols"), py::arg("row_stride"), py::arg("k"),
        py::arg("values"), py::arg("indices"), py::arg("num_threads"),
        "values / indices [rows, k] = the k largest of each fp32 row, largest first (equal values: lower "
        "index first); returns False, leaving them undefined, when a row holds a NaN.");
  m.def("log_softmax_top_k_rows",
        [](uintptr_t x, int64_t rows, int64_t cols, int64_t row_stride, int64_t k, std::vector<int64_t> banned,
           uintptr_t values, uintptr_t indices, int num_threads) {
          std::sort(banned.begin(), banned.end());
          banned.erase(std::unique(banned.begin(), banned.end()), banned.end());
          const int64_t kept = k + static_cast<int64_t>(banned.size());
          if (k < 1 || kept > cols)
            throw py::value_error("log_softmax_top_k_rows needs 1 <= k and k + len(banned) <= cols");
          const auto* scores = reinterpret_cast<const float*>(x);
          auto* top_values = reinterpret_cast<float*>(values);
          auto* top_indices = reinterpret_cast<int64_t*>(indices);
          return every_row(rows, num_threads, [&](int64_t r) {
            thread_local std::vector<float> held;
            thread_local std::vector<int64_t> held_indices;
            held.resize(kept);
            held_indices.resize(kept);
            return log_softmax_top_k_row(scores + r * row_stride, cols, k, banned, top_values + r * k,
                                         top_indices + r * k, held.data(), held_indices.data());
          });
        },
        py::kw_only(), py::arg("x"), py::arg("rows"), py::arg("cols"), py::arg("row_stride"), py::arg("k"),
        py::arg("banned"), py::arg("values"), py::arg("indices"), py::arg("num_threads"),
        "values / indices [rows, k] = the k best of each fp32 row's log_softmax without the banned ids "
        "(which still count in its normaliser), in the logits' order (equal logits: lower index first); "
        "returns False, leaving them undefined, when a row holds a NaN or an infinite maximum.");
}

}  // namespace umt5_fast
