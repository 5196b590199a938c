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

void run_rms_norm_bf16(const uint16_t* x, const uint16_t* weight, float eps, uint16_t* out,
                       int64_t rows, int64_t dim, int num_threads) {
  void (*norm)(const uint16_t*, const uint16_t*, float, uint16_t*, int64_t, int64_t) = nullptr;
  UMT5_DISPATCH_ISA(ISA, norm = &kernels::rms_norm_bf16_rows<ISA>);
  const int64_t grain = std::max<int64_t>(1, (1 << 15) / std::max<int64_t>(dim, 1));
  parallel_for_ranges(rows, grain, num_threads, [&](int64_t begin, int64_t end) {
    norm(x + begin * dim, weight, eps, out + begin * dim, end - begin, dim);
  });
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
  m.def("rms_norm_bf16",
        [](uintptr_t x, uintptr_t weight, float eps, uintptr_t out, int64_t rows, int64_t dim,
           int num_threads) {
          py::gil_scoped_release no_gil;
          run_rms_norm_bf16(reinterpret_cast<const uint16_t*>(x),
                            reinterpret_cast<const uint16_t*>(weight), eps,
                            reinterpret_cast<uint16_t*>(out), rows, dim, num_threads);
        },
        py::kw_only(), py::arg("x"), py::arg("weight"), py::arg("eps"), py::arg("out"),
        py::arg("rows"), py::arg("dim"), py::arg("num_threads"),
        "rms_norm of a bf16 model (x, weight and out bf16 data pointers; fp32 variance).");
}

}  // namespace umt5_fast
