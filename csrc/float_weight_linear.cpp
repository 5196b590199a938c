// Float-weight linear with fp32 activations: y = x @ weight^T (+ residual), weight [N, K] stored as
// bf16 bits (widened exactly by a 16-bit shift), fp16 (widened exactly by F16C) or fp32. The fp32 form exists for decode-sized
// rows: there torch's BLAS GEMV can run far below memory bandwidth (MKL on AMD CPUs), while this
// kernel streams each weight row once for every x row. Accumulation in fp32.
#include <pybind11/pybind11.h>

#include "weight_only_linear.h"

namespace py = pybind11;

namespace umt5_fast {

template <typename WeightT>
void def_float_weight_linear(py::module_& m, const char* name, const char* doc) {
  m.def(name,
        [](uintptr_t x, uintptr_t weight, uintptr_t residual, uintptr_t y, int64_t rows,
           int64_t in_features, int64_t out_features, int num_threads) {
          const kernels::LinearProblem<WeightT> problem{
              reinterpret_cast<const float*>(x), reinterpret_cast<const WeightT*>(weight),
              /*scale=*/nullptr, reinterpret_cast<const float*>(residual),
              reinterpret_cast<float*>(y), rows, in_features, out_features};
          py::gil_scoped_release no_gil;
          run_weight_only_linear(problem, num_threads);
        },
        py::kw_only(), py::arg("x"), py::arg("weight"), py::arg("residual"), py::arg("y"),
        py::arg("rows"), py::arg("in_features"), py::arg("out_features"),
        py::arg("num_threads"), doc);
}

void register_float_weight_linear(py::module_& m) {
  def_float_weight_linear<uint16_t>(
      m, "bf16_linear",
      "y = x @ weight^T (+ residual) with bf16 weight bits on data pointers (residual = 0: none).");
  def_float_weight_linear<Fp16>(
      m, "fp16_linear",
      "y = x @ weight^T (+ residual) with fp16 weights on data pointers (residual = 0: none).");
  def_float_weight_linear<float>(
      m, "f32_linear", "y = x @ weight^T (+ residual) with fp32 weights on data pointers (residual = 0: none).");
}

}  // namespace umt5_fast
