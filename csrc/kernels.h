// The ISA-specific math, declared once and defined in kernels_impl.h. kernels_<isa>.cpp
// instantiates every kernel for its ISA; op files call them through UMT5_DISPATCH_ISA and own
// shapes, threading and the Python binding. Kernels assume validated inputs.
#pragma once

#include <cstdint>

#include "cpu_isa.h"
#include "fp16.h"

namespace umt5_fast {

// Score of a masked (query, key) pair (umt5_fast.ops.MASKED_SCORE). Finite, so a query row whose
// keys are all masked averages V uniformly, as transformers' additive finfo.min mask does.
constexpr float kMaskedScore = -1.0e30f;

// Element type of attention operands: fp32, bf16 bits (uint16_t) or Fp16.
enum class AttentionElement { f32, bf16, f16 };

namespace kernels {

// Every vector width divides this; row buffers are padded to it so kernels never branch on
// a partial vector.
constexpr int kPad = 16;

inline int64_t round_up(int64_t n, int64_t multiple) { return (n + multiple - 1) / multiple * multiple; }

// ---------------------------------------------------------------------------------------------
// Attention: a block of consecutive query rows of one (batch, head) against a range of keys,
// tiled over keys with an online softmax.
// Keys per softmax step: a K/V tile stays in L2 (at head_dim 64, 32 KB each of K and V in fp32),
// and each step's rescaling of the accumulator is shared by 128 keys (64: 3-5% slower on a Zen 4,
// AVX-512 and AVX2 kernels alike; 256: no faster).
constexpr int kAttentionKeyTile = 128;
constexpr int kAttentionMaxRows = 32;  // query rows per block, all reusing each K/V tile

struct AttentionBlock {
  const float* q;  // first query row of the block; rows q_row_stride apart
  int64_t q_row_stride;
  const void* k;  // key 0 of this (batch, head), of kv_element
  int64_t k_row_stride;
  const void* v;
  int64_t v_row_stride;
  // Element of k and v: fp32, or bf16 / fp16, which the kernel widens (exactly) as it loads them
  // (one query row) or one key tile at a time into its scratch (several rows), so that a decode
  // step reads a half-precision cache without an fp32 copy.
  AttentionElement kv_element = AttentionElement::f32;
  float* out;  // output row of the first query; rows out_row_stride apart
  int64_t out_row_stride;
  int num_rows;  // <= kAttentionMaxRows
  int head_dim;
  float scale;
  // Keys outside [key_begin, key_end) are masked for every row of the block and are skipped.
  int64_t key_begin, key_end;
  // Additive term of (row r, key j): position_term[j - r] (bias of the relative position, or
  // kMaskedScore for a causally masked pair); nullptr when there is none. Readable up to kPad
  // entries past the last key.
  const float* position_term;
  // The same terms for blocks of several rows: the term of (row r, key j) is
  // position_term_reversed[r - j], readable for r in [0, kAttentionMaxRows) (rows past num_rows
  // read padding).
  const float* position_term_reversed;
  // Additive term of key j: key_term[j], 0 or kMaskedScore (padding); nullptr when no key is
  // padded. Readable up to kPad entries past the last key.
  const float* key_term;
};

// Floats of per-thread scratch attention_block needs for this head_dim, K/V element and number of
// query rows (blocks of several rows widen half-precision K/V tiles into it).
inline int64_t attention_scratch_floats(int head_dim, AttentionElement kv_element, int64_t query_rows) {
  const int64_t rows = round_up(kAttentionMaxRows, 4), dim = round_up(head_dim, kPad);
  const bool widens_tiles = kv_element != AttentionElement::f32 && query_rows > 1;
  const int64_t widened_tiles = widens_tiles ? 2 * kAttentionKeyTile * dim : 0;
  return rows * (2 * dim + kAttentionKeyTile + 3) + widened_tiles;
}

// Writes softmax(scale * q k^T + terms) v for each row of the block (rows whose keys are all
// masked come out as a softmax over the processed keys only: the caller overwrites them).
template <CpuIsa ISA>
void attention_block(const AttentionBlock& block, float* scratch);

// ---------------------------------------------------------------------------------------------
// RMSNorm rows (T5LayerNorm, fp32): out = weight * (h * rsqrt(mean(h^2) + eps)) with h = x, or
// h = x + residual (written to hidden) when residual is not null. Rows are contiguous.
template <CpuIsa ISA>
void rms_norm_rows(const float* x, const float* residual, const float* weight, float eps,
                   float* hidden, float* out, int64_t rows, int64_t dim);

// The same for a bf16 or fp16 model (Half: uint16_t holding bf16 bits, or Fp16; X: Half, or fp32
// for the fp32 residual stream an fp16 model's fp32 `wo` leaves): the variance of the widened x in
// fp32 exactly as rms_norm_rows sums it, h * rsqrt rounded to Half, times the weight, rounded again
// (transformers' rounding points). Instantiated for (bf16, bf16), (Fp16, Fp16), (float, Fp16).
template <CpuIsa ISA, typename X, typename Half>
void rms_norm_half_rows(const X* x, const Half* weight, float eps, Half* out, int64_t rows, int64_t dim);

// out[i] = in[i] converted: bf16 bits or Fp16 widened to fp32 (exact), or fp32 rounded to them
// (nearest even). Instantiated for those four directions.
template <CpuIsa ISA, typename From, typename To>
void convert_values(const From* in, To* out, int64_t n);

// ---------------------------------------------------------------------------------------------
// Gated activation epilogue: out = act(a) * b, or act(a) when b is null; T is float, or bf16
// (uint16_t) / Fp16, widened exactly in registers, computed in fp32 and rounded once.
enum class Activation { gelu_tanh, gelu_erf, relu, silu };

template <CpuIsa ISA, typename T>
void gated_activation_rows(Activation activation, const T* a, int64_t a_row_stride, const T* b,
                           int64_t b_row_stride, T* out, int64_t out_row_stride, int64_t rows,
                           int64_t cols);

// Sum of exp(x[i] - shift) over i < n, shift >= every x (the vector exp takes terms under e^-87
// as 0: x86 computes subnormal results through microcode assists), in vector lanes: log_softmax's
// normaliser without writing the log-probabilities.
template <CpuIsa ISA>
float exp_sum(const float* x, int64_t n, float shift);

// ---------------------------------------------------------------------------------------------
// Weight-only linear: y[m, n] = scale[n] * sum_k x[m, k] * w[n, k] (+ residual[m, n]) for the
// output columns [n_begin, n_end). WeightT is int8_t (scale per output row), uint16_t holding
// bf16 bits, Fp16 or float (scale null). x: [M, K], w: [N, K], y and residual: [M, N], all contiguous.
template <typename WeightT>
struct LinearProblem {
  const float* x;
  const WeightT* weight;
  const float* scale;
  const float* residual;
  float* y;
  int64_t rows, in_features, out_features;  // M, K, N
};

template <CpuIsa ISA, typename WeightT>
void weight_only_linear(const LinearProblem<WeightT>& problem, int64_t n_begin, int64_t n_end);

// The same product for many rows (kernels_impl.h: panel_linear), the columns [n_begin, n_end)
// (at most kPanelColumns) in one chunk: their weights widened into `packed` (kPanelColumns *
// kPanelDepth floats), sums over more than kPanelDepth values of k kept between blocks in
// `partial` (rows * kPanelColumns floats). Each output is summed in order of k, whatever the rows.
constexpr int64_t kPanelMinRows = 33;  // fewer: weight_only_linear, which reads the weights once
constexpr int64_t kPanelColumns = 128;
constexpr int64_t kPanelDepth = 512;

template <CpuIsa ISA, typename WeightT>
void panel_linear(const LinearProblem<WeightT>& problem, int64_t n_begin, int64_t n_end, float* packed,
                  float* partial);

// One row of an int8 weight in blocks (expand_weights.cpp): out[b * block + c] =
// values[b * block_stride + c] * scale[b] for b < blocks, c < block, in fp32 or rounded once to
// bf16 (OutT uint16_t).
template <CpuIsa ISA, typename OutT>
void expand_int8_row(const int8_t* values, int64_t block_stride, const float* scale,
                     int64_t blocks, int64_t block, OutT* out);

}  // namespace kernels
}  // namespace umt5_fast
