// Gated-FFN epilogue: out = act(a) * b (or act(a)), a and b [rows, cols] with row strides, so
// they may be the two halves of one [rows, 2 * cols] GEMM output; out may alias a.
#include <stdexcept>
#include <string>

#include <pybind11/pybind11.h>

#include "ops.h"
#include "parallel.h"

namespace py = pybind11;

namespace umt5_fast {

kernels::Activation activation_from_name(const std::string& name) {
  if (name == "gelu_tanh") return kernels::Activation::gelu_tanh;
  if (name == "gelu_erf") return kernels::Activation::gelu_erf;
  if (name == "relu") return kernels::Activation::relu;
  if (name == "silu") return kernels::Activation::silu;
  throw std::invalid_argument("activation must be 'gelu_tanh', 'gelu_erf', 'relu' or 'silu', got '" +
                              name + "'");
}

template <typename T>
void run_gated_activation(kernels::Activation activation, const T* a, int64_t a_row_stride, const T* b,
                          int64_t b_row_stride, T* out, int64_t out_row_stride, int64_t rows, int64_t cols,
                          int num_threads) {
  void (*apply)(kernels::Activation, const T*, int64_t, const T*, int64_t, T*, int64_t, int64_t,
                int64_t) = nullptr;
  UMT5_DISPATCH_ISA(ISA, apply = &kernels::gated_activation_rows<ISA, T>);
  const int64_t grain = std::max<int64_t>(1, (1 << 14) / std::max<int64_t>(cols, 1));
  parallel_for_ranges(rows, grain, num_threads, [&](int64_t begin, int64_t end) {
    apply(activation, a + begin * a_row_stride, a_row_stride,
          b ? b + begin * b_row_stride : nullptr, b_row_stride, out + begin * out_row_stride,
          out_row_stride, end - begin, cols);
  });
}

template void run_gated_activation(kernels::Activation, const float*, int64_t, const float*, int64_t, float*,
                                   int64_t, int64_t, int64_t, int);
template void run_gated_activation(kernels::Activation, const uint16_t*, int64_t, const uint16_t*, int64_t,
                                   uint16_t*, int64_t, int64_t, int64_t, int);
template void run_gated_activation(kernels::Activation, const Fp16*, int64_t, const Fp16*, int64_t, Fp16*,
                                   int64_t, int64_t, int64_t, int);

// One binding per element type: T is float, uint16_t (bf16 bits) or Fp16.
template <typename T>
void def_gated_activation(py::module_& m, const char* name, const char* doc) {
  m.def(name,
        [](const std::string& activation, uintptr_t a, int64_t a_row_stride, uintptr_t b,
           int64_t b_row_stride, uintptr_t out, int64_t out_row_stride, int64_t rows, int64_t cols,
           int num_threads) {
          const kernels::Activation act = activation_from_name(activation);
          py::gil_scoped_release no_gil;
          run_gated_activation(act, reinterpret_cast<const T*>(a), a_row_stride,
                               reinterpret_cast<const T*>(b), b_row_stride, reinterpret_cast<T*>(out),
                               out_row_stride, rows, cols, num_threads);
        },
        py::kw_only(), py::arg("activation"), py::arg("a"), py::arg("a_row_stride"), py::arg("b"),
        py::arg("b_row_stride"), py::arg("out"), py::arg("out_row_stride"), py::arg("rows"),
        py::arg("cols"), py::arg("num_threads"), doc);
}

void register_gated_act(py::module_& m) {
  def_gated_activation<float>(m, "gated_activation",
                              "out = act(a) * b on fp32 data pointers (b = 0: out = act(a)); activation is "
                              "'gelu_tanh', 'gelu_erf', 'relu' or 'silu'.");
  def_gated_activation<uint16_t>(m, "gated_activation_bf16",
                                 "gated_activation on bf16 data pointers: computed in fp32, rounded to bf16 once.");
  def_gated_activation<Fp16>(m, "gated_activation_fp16",
                             "gated_activation on fp16 data pointers: computed in fp32, rounded to fp16 once.");
}

}  // namespace umt5_fast
