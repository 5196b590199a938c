// bf16-weight linear with fp32 activations: y = x @ weight.float()^T (+ residual); weight [N, K]
// stored as bf16 (widened exactly by a 16-bit shift), accumulation in fp32.
#include <pybind11/pybind11.h>

#include "weight_only_linear.h"

namespace py = pybind11;

namespace umt5_fast {

void register_bf16_linear(py::module_& m) {
  m.def("bf16_linear",
        [](uintptr_t x, uintptr_t weight, uintptr_t residual, uintptr_t y, int64_t rows,
           int64_t in_features, int64_t out_features, int num_threads) {
          const kernels::LinearProblem<uint16_t> problem{
              reinterpret_cast<const float*>(x), reinterpret_cast<const uint16_t*>(weight),
              /*scale=*/nullptr, reinterpret_cast<const float*>(residual),
              reinterpret_cast<float*>(y), rows, in_features, out_features};
          py::gil_scoped_release no_gil;
          run_weight_only_linear(problem, num_threads);
        },
        py::kw_only(), py::arg("x"), py::arg("weight"), py::arg("residual"), py::arg("y"),
        py::arg("rows"), py::arg("in_features"), py::arg("out_features"),
        py::arg("num_threads"),
        "y = x @ weight^T (+ residual) with bf16 weight bits on data pointers (residual = 0: "
        "none).");
}

}  // namespace umt5_fast
