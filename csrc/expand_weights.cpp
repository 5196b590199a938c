// Expansion of 8-bit packed weights (umt5_fast.quant) to bf16 / fp32, one layer at a time, right
// before its GEMM. torch needs several passes and an fp32 temporary for this (fp8 -> bf16 of a
// 4096 x 10240 weight: ~100 ms on 2 cores, as long as the bf16 GEMM of 512 tokens that follows).
// One vectorised pass here (kernels::expand_int8_row for int8 / Q8_0) is memory-bound: Q8_0 ->
// bf16 of that weight takes 11.1 ms on a Xeon (17.6 with a scalar loop). Results are
// bit-identical to the torch expressions in quant.py: one fp32 multiply, then one
// round-to-nearest-even to the target dtype.
#include <cstdint>
#include <algorithm>
#include <stdexcept>

#include <pybind11/pybind11.h>

#include "cpu_isa.h"
#include "kernels.h"
#include "parallel.h"

namespace py = pybind11;

namespace umt5_fast {
namespace {

constexpr int64_t kGrain = 1 << 16;  // elements per thread at least

// dst[i] = table[src[i]]: every fp8 value (with its per-tensor scale already applied) is one of 256
// entries, which Python computes with torch itself, so NaN, subnormals and rounding match torch.
template <class T>
void expand_by_table(const uint8_t* src, int64_t n, const T* table, T* dst, int threads) {
  parallel_for_ranges(n, kGrain, threads, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) dst[i] = table[src[i]];
  });
}

// dst[r, c] = q[r, c] * scale[r, c / block] for int8 q in blocks of `block` contiguous values
// (block b of row r at q + r * row_stride + b * block_stride: a plain [rows, cols] matrix, or
// GGUF Q8_0 blocks with their fp16 scale in between) and fp32 scale [rows, cols / block].
template <typename OutT>
void expand_int8(const int8_t* q, int64_t row_stride, int64_t block_stride, const float* scale,
                 int64_t rows, int64_t cols, int64_t block, int threads, OutT* out) {
  const int64_t blocks_per_row = cols / block;
  void (*expand_row)(const int8_t*, int64_t, const float*, int64_t, int64_t, OutT*) = nullptr;
  UMT5_DISPATCH_ISA(ISA, expand_row = &kernels::expand_int8_row<ISA, OutT>);
  parallel_for_ranges(rows, std::max<int64_t>(1, kGrain / cols), threads,
                      [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r)
      expand_row(q + r * row_stride, block_stride, scale + r * blocks_per_row, blocks_per_row,
                 block, out + r * cols);
  });
}

}  // namespace

void register_expand_weights(py::module_& m) {
  m.def("expand_by_table",
        [](uintptr_t src, int64_t n, uintptr_t table, int element_bytes, uintptr_t dst,
           int num_threads) {
          const auto* codes = reinterpret_cast<const uint8_t*>(src);
          py::gil_scoped_release no_gil;
          if (element_bytes == 2)
            expand_by_table(codes, n, reinterpret_cast<const uint16_t*>(table),
                            reinterpret_cast<uint16_t*>(dst), num_threads);
          else if (element_bytes == 4)
            expand_by_table(codes, n, reinterpret_cast<const uint32_t*>(table),
                            reinterpret_cast<uint32_t*>(dst), num_threads);
          else
            throw std::invalid_argument("element_bytes must be 2 or 4");
        },
        py::kw_only(), py::arg("src"), py::arg("n"), py::arg("table"), py::arg("element_bytes"),
        py::arg("dst"), py::arg("num_threads"),
        "dst[i] = table[src[i]] for n uint8 codes and a 256-entry table of 2- or 4-byte values.");
  m.def("expand_int8",
        [](uintptr_t q, int64_t row_stride, int64_t block_stride, uintptr_t scale, int64_t rows,
           int64_t cols, int64_t block, uintptr_t dst, bool to_bf16, int num_threads) {
          if (block < 1 || cols % block != 0)
            throw std::invalid_argument("cols must be a multiple of block");
          const auto* values = reinterpret_cast<const int8_t*>(q);
          const auto* scales = reinterpret_cast<const float*>(scale);
          py::gil_scoped_release no_gil;
          if (to_bf16)
            expand_int8(values, row_stride, block_stride, scales, rows, cols, block, num_threads,
                        reinterpret_cast<uint16_t*>(dst));
          else
            expand_int8(values, row_stride, block_stride, scales, rows, cols, block, num_threads,
                        reinterpret_cast<float*>(dst));
        },
        py::kw_only(), py::arg("q"), py::arg("row_stride"), py::arg("block_stride"),
        py::arg("scale"), py::arg("rows"), py::arg("cols"),
        py::arg("block"), py::arg("dst"), py::arg("to_bf16"), py::arg("num_threads"),
        "dst[r, c] = q[r, c] * scale[r, c / block] (int8 q in strided blocks, fp32 scale) as "
        "bf16 or fp32.");
}

}  // namespace umt5_fast
