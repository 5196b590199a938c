// Weight-only int8 linear: y = x @ (qweight * scale[:, None])^T (+ residual); fp32 x [M, K],
// qweight int8 [N, K], per-output-row fp32 scale [N]. Memory-bound at decode sizes: the int8
// weights are read once and widened in registers.
#include <pybind11/pybind11.h>

#include "weight_only_linear.h"

namespace py = pybind11;

namespace umt5_fast {

void register_int8_linear(py::module_& m) {
  m.def("int8_linear",
        [](uintptr_t x, uintptr_t qweight, uintptr_t scale, uintptr_t residual, uintptr_t y,
           int64_t rows, int64_t in_features, int64_t out_features, int num_threads) {
          const kernels::LinearProblem<int8_t> problem{
              reinterpret_cast<const float*>(x), reinterpret_cast<const int8_t*>(qweight),
              reinterpret_cast<const float*>(scale), reinterpret_cast<const float*>(residual),
              reinterpret_cast<float*>(y), rows, in_features, out_features};
          py::gil_scoped_release no_gil;
          run_weight_only_linear(problem, num_threads);
        },
        py::kw_only(), py::arg("x"), py::arg("qweight"), py::arg("scale"), py::arg("residual"),
        py::arg("y"), py::arg("rows"), py::arg("in_features"), py::arg("out_features"),
        py::arg("num_threads"),
        "y = x @ (qweight * scale)^T (+ residual) on data pointers (residual = 0: none).");
}

}  // namespace umt5_fast
