// W8A8 linear: int8 weights (per-output-row scales) times activations quantised to int8 per row at
// run time, multiplied in integers: what CTranslate2 calls int8 compute. Shared between
// w8a8_linear.cpp (quantisation, portable kernel, dispatch), w8a8_vnni.cpp (AVX512-VNNI) and
// w8a8_avx2.cpp (AVX2).
#pragma once

#include <algorithm>
#include <cstdint>
#include <limits>

namespace umt5_fast {

// Rows of the activation buffer come in multiples of this; K is padded to kW8A8KPad bytes.
constexpr int kW8A8TileRows = 4;
constexpr int kW8A8KPad = 64;
// (w + 128) * q summed over K must fit int32: 255 * 127 * 65536 < 2^31.
constexpr int64_t kW8A8MaxK = 65536;

// The weight's layout (umt5_fast.quant.W8A8Weight): blocks of kW8A8BlockColumns output columns
// (the last padded with zero columns), each 16 * K contiguous bytes: K / 4 groups of 64 bytes,
// byte 4 j + t of group g holding w[16 b + j][4 g + t] (column j in 32-bit lane j: vpdpbusd's
// operand, so sums need no horizontal reduction), then the K % 4 last entries of each column,
// column after column.
constexpr int kW8A8BlockColumns = 16;
// The row layout (umt5_fast.quant.QuantizedWeight's int8 rows, which the LM head screen multiplies
// in integers without a second copy): w[n][k] at byte n * K + k. The integer sums are exact, and
// the fp32 epilogue the same, so both layouts give identical bits.

// (static: these helpers serve translation units built with different ISA flags, and each must keep
// its own copy; one shared inline copy could carry AVX-512 code into a portable caller.)
// v rounded to the nearest integer, ties to even (torch.round's rule), clamped to [-127, 127]: the
// rounding of both int8 quantisers (activations per call here, weights at load in
// quantize_weights.cpp). Adding and subtracting 1.5 * 2^23 rounds |v| < 2^22 without a libm call,
// so the loops vectorise; clamping first keeps v in range (NaN must not reach it).
static inline int8_t round_to_int8(float v) {
  constexpr float kRoundingShift = 12582912.0f;
  const float clamped = v < -127.0f ? -127.0f : (v > 127.0f ? 127.0f : v);
  return static_cast<int8_t>((clamped + kRoundingShift) - kRoundingShift);
}

// Shared by the ISA kernels (w8a8_vnni.cpp, w8a8_avx2.cpp). Internal linkage: each translation
// unit keeps its own copy, compiled with its own ISA flags (the one shared copy of an inline
// function could carry AVX-512 instructions into the AVX2 kernel).
namespace w8a8_tiles {
namespace {

// Activation rows per pass: about 256 KiB of them stay in L2 while the weight blocks pass.
[[maybe_unused]] int64_t row_block(int64_t k_padded) {
  return std::max<int64_t>(kW8A8TileRows, (int64_t{256} << 10) / k_padded / kW8A8TileRows * kW8A8TileRows);
}

// The K % 4 last entries of each column of a weight block (stored column after column after the
// K / 4 full groups) into lanes[4 j + t], as one more 64-byte group; the other bytes stay zero
// (zero bytes past K meet the zero padding of q).
[[maybe_unused]] void gather_tail(const int8_t* block, int64_t groups, int tail, int8_t* lanes) {
  for (int j = 0; j < kW8A8BlockColumns; ++j)
    for (int t = 0; t < tail; ++t) lanes[4 * j + t] = block[groups * 4 * kW8A8BlockColumns + j * tail + t];
}

}  // namespace
}  // namespace w8a8_tiles

struct W8A8Problem {
  const int8_t* q;        // [rows_padded, k_padded] quantised activations, zero padded
  const int32_t* q_sums;  // [rows_padded] sum over k of q
  const float* x_scale;   // [rows_padded] x ~= q * x_scale (NaN for a row with inf / NaN)
  const int8_t* w;        // [ceil(out_features / 16) blocks][16 * in_features], or the row layout
  const float* w_scale;   // [out_features]
  const float* residual;  // [rows, out_features] or nullptr
  float* y;               // [rows, out_features]
  int64_t rows, in_features, k_padded, out_features;
};

// 127 / amax for a row's maximum |x| > 0, and the matching scale amax / 127. Below amax ~3.7e-37
// 127 / amax overflows: the largest float and its reciprocal stand in (q stays within +-127).
static inline float w8a8_inverse_scale(float amax) {
  const float inverse = 127.0f / amax;
  return inverse > std::numeric_limits<float>::max() ? std::numeric_limits<float>::max() : inverse;
}
static inline float w8a8_row_scale(float amax) {
  return 127.0f / amax > std::numeric_limits<float>::max() ? 1.0f / std::numeric_limits<float>::max()
                                                           : amax / 127.0f;
}

// One activation row x[0, k) quantised: q = round_half_even(x * (127 / amax)) in [-127, 127]
// (written to q, whose other bytes stay zero), *sum = sum of q, *scale = amax / 127; a zero row
// leaves q, *sum and *scale untouched (zeros), a row with inf / NaN sets *scale = NaN only. All
// versions give identical bits.
void w8a8_quantise_row_portable(const float* row, int64_t k, int8_t* q, int32_t* sum, float* scale);
void w8a8_quantise_row_vnni(const float* row, int64_t k, int8_t* q, int32_t* sum, float* scale);
void w8a8_quantise_row_avx2(const float* row, int64_t k, int8_t* q, int32_t* sum, float* scale);

// y[m, n] = float(sum_k q[m, k] * w[n, k]) * (x_scale[m] * w_scale[n]) (+ residual[m, n]) for
// the output columns of weight blocks [block_begin, block_end) and all rows: the same fp32
// operations in every kernel, so all give identical bits.
void w8a8_blocks_portable(const W8A8Problem& p, int64_t block_begin, int64_t block_end);

// The integer GEMMs over weight blocks [block_begin, block_end), each with the number of weight
// blocks its tiles take for this many rows (by which run_w8a8_linear cuts the blocks among threads;
// static, as the helpers above).
static inline int w8a8_tile_blocks_vnni(int64_t rows) { return rows == 1 ? 8 : 4; }
void w8a8_blocks_vnni(const W8A8Problem& p, int64_t block_begin, int64_t block_end);
static inline int w8a8_tile_blocks_avx2(int64_t rows) { return rows == 1 ? 4 : rows == 2 ? 2 : 1; }
void w8a8_blocks_avx2(const W8A8Problem& p, int64_t block_begin, int64_t block_end);

// The same products on the row layout, for the output columns [row_begin, row_end) (weight rows).
void w8a8_rows_portable(const W8A8Problem& p, int64_t row_begin, int64_t row_end);
void w8a8_rows_vnni(const W8A8Problem& p, int64_t row_begin, int64_t row_end);
void w8a8_rows_avx2(const W8A8Problem& p, int64_t row_begin, int64_t row_end);

bool cpu_supports_avx512_vnni();

}  // namespace umt5_fast
