// RMSNorm (T5LayerNorm) and residual-add + RMSNorm over rows of a contiguous fp32 [rows, dim].
#include <algorithm>

#include <pybind11/pybind11.h>

#include "ops.h"
#include "parallel.h"

namespace py = pybind11;

namespace umt5_fast {

void run_rms_norm(const float* x, const float* residual, const float* weight, float eps,
                  float* hidden, float* out, int64_t rows, int64_t dim, int num_threads) {
  void (*norm)(const float*, const float*, const float*, float, float*, float*, int64_t,
               int64_t) = nullptr;
  UMT5_DISPATCH_ISA(ISA, norm = &kernels::rms_norm_rows<ISA>);
  const int64_t grain = std::max<int64_t>(1, (1 << 15) / std::max<int64_t>(dim, 1));
  parallel_for_ranges(rows, grain, num_threads, [&](int64_t begin, int64_t end) {
    norm(x + begin * dim, residual ? residual + begin * dim : nullptr, weight, eps,
         hidden ? hidden + begin * dim : nullptr, out + begin * dim, end - begin, dim);
  });
}

template <typename X, typename Half>
void run_rms_norm_half(const X* x, const Half* weight, float eps, Half* out, int64_t rows, int64_t dim,
                       int num_threads) {
  void (*norm)(const X*, const Half*, float, Half*, int64_t, int64_t) = nullptr;
  UMT5_DISPATCH_ISA(ISA, norm = &kernels::rms_norm_half_rows<ISA, X, Half>);
  const int64_t grain = std::max<int64_t>(1, (1 << 15) / std::max<int64_t>(dim, 1));
  parallel_for_ranges(rows, grain, num_threads, [&](int64_t begin, int64_t end) {
    norm(x + begin * dim, weight, eps, out + begin * dim, end - begin, dim);
  });
}

template void run_rms_norm_half(const uint16_t*, const uint16_t*, float, uint16_t*, int64_t, int64_t, int);
template void run_rms_norm_half(const Fp16*, const Fp16*, float, Fp16*, int64_t, int64_t, int);
template void run_rms_norm_half(const float*, const Fp16*, float, Fp16*, int64_t, int64_t, int);

// One binding per (x, weight / out) element pair: X is float, uint16_t (bf16 bits) or Fp16.
template <typename X, typename Half>
void def_rms_norm_half(py::module_& m, const char* name, const char* doc) {
  m.def(name,
        [](uintptr_t x, uintptr_t weight, float eps, uintptr_t out, int64_t rows, int64_t dim,
           int num_threads) {
          py::gil_scoped_release no_gil;
          run_rms_norm_half(reinterpret_cast<const X*>(x), reinterpret_cast<const Half*>(weight), eps,
                            reinterpret_cast<Half*>(out), rows, dim, num_threads);
        },
        py::kw_only(), py::arg("x"), py::arg("weight"), py::arg("eps"), py::arg("out"),
        py::arg("rows"), py::arg("dim"), py::arg("num_threads"), doc);
}

void register_rms_norm(py::module_& m) {
  m.def("rms_norm",
        [](uintptr_t x, uintptr_t weight, float eps, uintptr_t out, int64_t rows, int64_t dim,
           int num_threads) {
          py::gil_scoped_release no_gil;
          run_rms_norm(reinterpret_cast<const float*>(x), nullptr,
                       reinterpret_cast<const float*>(weight), eps, nullptr,
                       reinterpret_cast<float*>(out), rows, dim, num_threads);
        },
        py::kw_only(), py::arg("x"), py::arg("weight"), py::arg("eps"), py::arg("out"),
        py::arg("rows"), py::arg("dim"), py::arg("num_threads"),
        "out = weight * (x * rsqrt(mean(x^2) + eps)) on fp32 data pointers.");
  m.def("add_rms_norm",
        [](uintptr_t x, uintptr_t residual, uintptr_t weight, float eps, uintptr_t hidden,
           uintptr_t out, int64_t rows, int64_t dim, int num_threads) {
          py::gil_scoped_release no_gil;
          run_rms_norm(reinterpret_cast<const float*>(x), reinterpret_cast<const float*>(residual),
                       reinterpret_cast<const float*>(weight), eps,
                       reinterpret_cast<float*>(hidden), reinterpret_cast<float*>(out), rows, dim,
                       num_threads);
        },
        py::kw_only(), py::arg("x"), py::arg("residual"), py::arg("weight"), py::arg("eps"),
        py::arg("hidden"), py::arg("out"), py::arg("rows"), py::arg("dim"),
        py::arg("num_threads"),
        "hidden = x + residual; out = rms_norm(hidden) in one pass, on fp32 data pointers.");
  def_rms_norm_half<uint16_t, uint16_t>(
      m, "rms_norm_bf16", "rms_norm of a bf16 model (x, weight and out bf16 data pointers; fp32 variance).");
  def_rms_norm_half<Fp16, Fp16>(
      m, "rms_norm_fp16", "rms_norm of an fp16 model (x, weight and out fp16 data pointers; fp32 variance).");
  def_rms_norm_half<float, Fp16>(
      m, "rms_norm_fp32_to_fp16",
      "rms_norm of an fp16 model's fp32 residual stream (x fp32; weight and out fp16 data pointers).");
}

}  // namespace umt5_fast
