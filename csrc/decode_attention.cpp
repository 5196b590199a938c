// Decode-step attention: one query row per (batch, head) at position cache_length - 1 against
// the first cache_length keys of a static [B, H, S_max, D] cache. It is run_attention with
// Lq = 1 and a causal query offset; the single-row block takes the kernel's one-row path.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "attention.h"

namespace py = pybind11;

namespace umt5_fast {

void register_decode_attention(py::module_& m) {
  m.def("decode_attention",
        [](uintptr_t q, std::array<int64_t, 3> q_strides, uintptr_t k_cache,
           std::array<int64_t, 3> k_strides, uintptr_t v_cache, std::array<int64_t, 3> v_strides,
           uintptr_t out, int64_t batch, int64_t heads, int64_t cache_length, int head_dim,
           uintptr_t bias_table, uintptr_t distance_buckets, int num_buckets, int max_distance,
           uintptr_t key_padding_mask,
           int64_t mask_batch_stride, int num_threads) {
          AttentionProblem problem{
              reinterpret_cast<const float*>(q), q_strides,
              reinterpret_cast<const float*>(k_cache), k_strides,
              reinterpret_cast<const float*>(v_cache), v_strides,
              reinterpret_cast<float*>(out), batch, heads, /*query_length=*/1, cache_length,
              head_dim, reinterpret_cast<const float*>(bias_table),
              reinterpret_cast<const int32_t*>(distance_buckets), num_buckets, max_distance,
              /*bidirectional=*/false, reinterpret_cast<const uint8_t*>(key_padding_mask),
              mask_batch_stride, /*causal=*/true, /*query_offset=*/cache_length - 1,
              /*scale=*/1.0f, num_threads};
          py::gil_scoped_release no_gil;
          run_attention(problem);
        },
        py::kw_only(), py::arg("q"), py::arg("q_strides"), py::arg("k_cache"),
        py::arg("k_strides"), py::arg("v_cache"), py::arg("v_strides"), py::arg("out"),
        py::arg("batch"), py::arg("heads"), py::arg("cache_length"), py::arg("head_dim"),
        py::arg("bias_table"), py::arg("distance_buckets"), py::arg("num_buckets"), py::arg("max_distance"),
        py::arg("key_padding_mask"), py::arg("mask_batch_stride"), py::arg("num_threads"),
        "Decode-step attention on data pointers (fp32; validated by "
        "umt5_fast.ops.cpu.decode_attention).");
}

}  // namespace umt5_fast
