// One PYBIND11_MODULE; each kernel file registers its own functions.
#include <pybind11/pybind11.h>

namespace py = pybind11;

namespace umt5_fast {
void register_cpu_isa(py::module_& m);
void register_bucket(py::module_& m);
void register_attention(py::module_& m);
void register_decode_attention(py::module_& m);
void register_rms_norm(py::module_& m);
void register_gated_act(py::module_& m);
void register_int8_linear(py::module_& m);
void register_float_weight_linear(py::module_& m);
void register_expand_weights(py::module_& m);
void register_w8a8_linear(py::module_& m);
void register_argmax(py::module_& m);
void register_decoder_step(py::module_& m);
void register_quantize_weights(py::module_& m);
void register_screen_candidates(py::module_& m);
void register_float_env(py::module_& m);
void register_top_k(py::module_& m);
void register_mt19937(py::module_& m);
}  // namespace umt5_fast

PYBIND11_MODULE(_C, m) {
  m.doc() = "umt5_fast C++ CPU kernels (called through umt5_fast.ops.cpu, which validates inputs)";
  umt5_fast::register_cpu_isa(m);
  umt5_fast::register_bucket(m);
  umt5_fast::register_attention(m);
  umt5_fast::register_decode_attention(m);
  umt5_fast::register_rms_norm(m);
  umt5_fast::register_gated_act(m);
  umt5_fast::register_int8_linear(m);
  umt5_fast::register_float_weight_linear(m);
  umt5_fast::register_expand_weights(m);
  umt5_fast::register_w8a8_linear(m);
  umt5_fast::register_argmax(m);
  umt5_fast::register_decoder_step(m);
  umt5_fast::register_quantize_weights(m);
  umt5_fast::register_screen_candidates(m);
  umt5_fast::register_float_env(m);
  umt5_fast::register_top_k(m);
  umt5_fast::register_mt19937(m);
}
