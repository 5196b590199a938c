// W8A8 linear (see w8a8_linear.h): per-row symmetric quantisation of the activations, then the
// integer GEMM on the column-block weight layout by the AVX512-VNNI or AVX2 kernel, or the portable
// kernel below (same results, bit for bit; run_w8a8_linear picks).
#include "w8a8_linear.h"

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <vector>

#include <pybind11/pybind11.h>

#include "cpu_isa.h"
#include "ops.h"
#include "parallel.h"

namespace py = pybind11;

namespace umt5_fast {
namespace {

struct QuantisedRows {
  std::vector<int8_t> q;
  std::vector<int32_t> sums;
  std::vector<float> scales;
};

using QuantiseRow = void (*)(const float*, int64_t, int8_t*, int32_t*, float*);

QuantisedRows quantise_rows(const float* x, int64_t rows, int64_t k, int64_t k_padded, QuantiseRow quantise,
                            int threads) {
  const int64_t rows_padded = (rows + kW8A8TileRows - 1) / kW8A8TileRows * kW8A8TileRows;
  QuantisedRows out{std::vector<int8_t>(rows_padded * k_padded, 0),
                    std::vector<int32_t>(rows_padded, 0), std::vector<float>(rows_padded, 0.0f)};
  parallel_for_ranges(rows, std::max<int64_t>(1, 4096 / std::max<int64_t>(k, 1)), threads,
                      [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m)
      quantise(x + m * k, k, out.q.data() + m * k_padded, &out.sums[m], &out.scales[m]);
  });
  return out;
}

// One instruction set's quantiser and integer GEMMs (column-block and row layouts), with the
// weight blocks its tiles take for a number of rows (by which run_w8a8_linear cuts the blocks among
// threads; the row layout's ranges are cut at multiples of 16 rows, any tile's width).
struct W8A8Kernels {
  QuantiseRow quantise_row;
  void (*blocks)(const W8A8Problem&, int64_t, int64_t);
  int (*tile_blocks)(int64_t rows);
  void (*rows)(const W8A8Problem&, int64_t, int64_t);
};

int one_block(int64_t) { return 1; }

// AVX512-VNNI where the CPU has it and the selected ISA is avx512, AVX2 on the avx2 and avx512
// ISAs otherwise (AVX-512 CPUs without VNNI), else the portable loops: identical results.
W8A8Kernels select_w8a8_kernels() {
  const CpuIsa isa = cpu_isa();
  if (isa == CpuIsa::avx512 && cpu_supports_avx512_vnni())
    return {&w8a8_quantise_row_vnni, &w8a8_blocks_vnni, &w8a8_tile_blocks_vnni, &w8a8_rows_vnni};
  if (isa == CpuIsa::avx2 || isa == CpuIsa::avx512)
    return {&w8a8_quantise_row_avx2, &w8a8_blocks_avx2, &w8a8_tile_blocks_avx2, &w8a8_rows_avx2};
  return {&w8a8_quantise_row_portable, &w8a8_blocks_portable, &one_block, &w8a8_rows_portable};
}

}  // namespace

void w8a8_quantise_row_portable(const float* row, int64_t k, int8_t* q, int32_t* sum, float* scale) {
  float amax = 0.0f;
  bool finite = true;
  for (int64_t i = 0; i < k; ++i) {
    amax = std::max(amax, std::fabs(row[i]));
    finite &= std::isfinite(row[i]);
  }
  if (!finite) {
    *scale = NAN;  // NaN outputs, as the eager reference gives
    return;
  }
  if (amax == 0.0f) return;
  const float inverse = w8a8_inverse_scale(amax);
  *scale = w8a8_row_scale(amax);
  int32_t total = 0;
  for (int64_t i = 0; i < k; ++i) {
    q[i] = round_to_int8(row[i] * inverse);
    total += q[i];
  }
  *sum = total;
}

void w8a8_blocks_portable(const W8A8Problem& p, int64_t block_begin, int64_t block_end) {
  constexpr int kColumns = kW8A8BlockColumns;
  const int64_t K = p.in_features, groups = K / 4;
  const int tail = static_cast<int>(K % 4);
  for (int64_t b = block_begin; b < block_end; ++b) {
    const int8_t* w = p.w + b * kColumns * K;
    const int64_t n0 = b * kColumns;
    const int columns = static_cast<int>(std::min<int64_t>(kColumns, p.out_features - n0));
    for (int64_t m = 0; m < p.rows; ++m) {
      const int8_t* q = p.q + m * p.k_padded;
      int32_t acc[kColumns] = {};
      for (int64_t g = 0; g < groups; ++g)
        for (int j = 0; j < kColumns; ++j)
          for (int t = 0; t < 4; ++t) acc[j] += q[4 * g + t] * w[g * 64 + 4 * j + t];
      for (int j = 0; j < kColumns; ++j)
        for (int t = 0; t < tail; ++t) acc[j] += q[4 * groups + t] * w[groups * 64 + j * tail + t];
      for (int j = 0; j < columns; ++j) {
        float value = static_cast<float>(acc[j]) * (p.x_scale[m] * p.w_scale[n0 + j]);
        if (p.residual) value = value + p.residual[m * p.out_features + n0 + j];
        p.y[m * p.out_features + n0 + j] = value;
      }
    }
  }
}

void w8a8_rows_portable(const W8A8Problem& p, int64_t row_begin, int64_t row_end) {
  const int64_t K = p.in_features;
  for (int64_t n = row_begin; n < row_end; ++n) {
    const int8_t* w = p.w + n * K;
    for (int64_t m = 0; m < p.rows; ++m) {
      const int8_t* q = p.q + m * p.k_padded;
      int32_t acc = 0;
      for (int64_t k = 0; k < K; ++k) acc += q[k] * w[k];
      float value = static_cast<float>(acc) * (p.x_scale[m] * p.w_scale[n]);
      if (p.residual) value = value + p.residual[m * p.out_features + n];
      p.y[m * p.out_features + n] = value;
    }
  }
}

bool cpu_supports_avx512_vnni() {
  return cpu_supports(CpuIsa::avx512) && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
}

void run_w8a8_linear(const float* x, const int8_t* qweight, bool row_layout, const float* scale,
                     const float* residual, float* y, int64_t rows, int64_t in_features,
                     int64_t out_features, int num_threads) {
  const int64_t k_padded = (in_features + kW8A8KPad - 1) / kW8A8KPad * kW8A8KPad;
  const W8A8Kernels kernels = select_w8a8_kernels();
  const QuantisedRows a = quantise_rows(x, rows, in_features, k_padded, kernels.quantise_row, num_threads);
  const W8A8Problem problem{a.q.data(), a.sums.data(), a.scales.data(), qweight, scale, residual,
                            y, rows, in_features, k_padded, out_features};
  // Each task takes whole tiles and enough work (~2^16 products, 64 KB of weights at one row) to
  // be worth a thread; small layers split into as many tiles as that allows. (With 2^18 a decode
  // step's 384- and 512-wide projections at one row ran on one thread, the other one waiting:
  // umt5-small's W8A8 greedy decoding at bs=1 took 9.7-9.9 ms/token on an Ice Lake Xeon, 9.3-9.4
  // with the split.)
  const int64_t grain_work = int64_t{1} << 16;
  if (row_layout) {
    constexpr int64_t kTileRows = 16;
    const int64_t tiles = (out_features + kTileRows - 1) / kTileRows;
    const int64_t tile_work = in_features * kTileRows * std::max<int64_t>(rows, 1);
    parallel_for_ranges(tiles, std::max<int64_t>(1, grain_work / tile_work), num_threads,
                        [&](int64_t begin, int64_t end) {
      kernels.rows(problem, begin * kTileRows, std::min(out_features, end * kTileRows));
    });
    return;
  }
  const int64_t tile_blocks = kernels.tile_blocks(rows);
  const int64_t blocks = (out_features + kW8A8BlockColumns - 1) / kW8A8BlockColumns;
  const int64_t tiles = (blocks + tile_blocks - 1) / tile_blocks;
  const int64_t tile_work = in_features * tile_blocks * kW8A8BlockColumns * std::max<int64_t>(rows, 1);
  const int64_t grain = std::max<int64_t>(1, grain_work / tile_work);
  parallel_for_ranges(tiles, grain, num_threads, [&](int64_t begin, int64_t end) {
    kernels.blocks(problem, begin * tile_blocks, std::min(blocks, end * tile_blocks));
  });
}

// ||x_r - scale_r q_r|| in fp64 per row, for the q and scale run_w8a8_linear multiplies with (the
// quantiser this CPU selects; NaN for a row with inf / NaN): the LM head screen's bound needs the
// actual activation error, about sqrt(3) below the worst case.
void w8a8_quantisation_error(const float* x, int64_t rows, int64_t in_features, double* out, int num_threads) {
  const int64_t k_padded = (in_features + kW8A8KPad - 1) / kW8A8KPad * kW8A8KPad;
  const QuantisedRows a = quantise_rows(x, rows, in_features, k_padded, select_w8a8_kernels().quantise_row,
                                        num_threads);
  for (int64_t m = 0; m < rows; ++m) {
    const double scale = a.scales[m];
    double sum = 0;
    for (int64_t k = 0; k < in_features; ++k) {
      const double error = x[m * in_features + k] - scale * a.q[m * k_padded + k];
      sum += error * error;
    }
    out[m] = std::isnan(scale) ? NAN : std::sqrt(sum);
  }
}

void register_w8a8_linear(py::module_& m) {
  m.def("w8a8_linear",
        [](uintptr_t x, uintptr_t qweight, bool row_layout, uintptr_t scale, uintptr_t residual,
           uintptr_t y, int64_t rows, int64_t in_features, int64_t out_features, int num_threads) {
          if (in_features < 1 || in_features > kW8A8MaxK)
            throw std::invalid_argument("w8a8_linear: in_features must be in [1, 65536]");
          py::gil_scoped_release no_gil;
          run_w8a8_linear(reinterpret_cast<const float*>(x), reinterpret_cast<const int8_t*>(qweight),
                          row_layout, reinterpret_cast<const float*>(scale),
                          reinterpret_cast<const float*>(residual), reinterpret_cast<float*>(y),
                          rows, in_features, out_features, num_threads);
        },
        py::kw_only(), py::arg("x"), py::arg("qweight"), py::arg("row_layout"), py::arg("scale"),
        py::arg("residual"), py::arg("y"), py::arg("rows"), py::arg("in_features"),
        py::arg("out_features"), py::arg("num_threads"),
        "y = int8(x) @ qweight^T, rescaled (+ residual): x quantised per row at run time; fp32 "
        "data pointers except int8 qweight, in column blocks or (row_layout) plain rows "
        "(residual = 0: none).");
  m.def("w8a8_quantisation_error",
        [](uintptr_t x, int64_t rows, int64_t in_features, uintptr_t out, int num_threads) {
          if (in_features < 1 || in_features > kW8A8MaxK)
            throw std::invalid_argument("w8a8_quantisation_error: in_features must be in [1, 65536]");
          py::gil_scoped_release no_gil;
          w8a8_quantisation_error(reinterpret_cast<const float*>(x), rows, in_features,
                                  reinterpret_cast<double*>(out), num_threads);
        },
        py::kw_only(), py::arg("x"), py::arg("rows"), py::arg("in_features"), py::arg("out"),
        py::arg("num_threads"),
        "out[r] = ||x_r - scale_r q_r|| (fp64 [rows]) for the int8 rows q and scales w8a8_linear "
        "quantises fp32 x [rows, in_features] to.");
  m.def("w8a8_row_layout_preferred", [] { return select_w8a8_kernels().rows != &w8a8_rows_vnni; },
        "Whether the W8A8 kernels of the selected ISA multiply the row layout at least as fast as "
        "the column blocks: all but the AVX512-VNNI ones (AVX2, at 4+ rows of x on a large weight, "
        "1.4-1.6x faster in rows; VNNI ~1.1-1.5x faster in blocks).");
  m.def("has_avx512_vnni", &cpu_supports_avx512_vnni,
        "Whether w8a8_linear can use the AVX512-VNNI kernel on this CPU.");
}

}  // namespace umt5_fast
