// Definitions of the kernels declared in kernels.h, written once over Vec<ISA>.
//
// Included only by kernels_<isa>.cpp, after the matching vec_<isa>.h, each compiled with its own
// ISA flags. Helpers live in an anonymous namespace so that no inline function compiled for a
// wider ISA can be picked by the linker for the portable build (each object exports only its
// own ISA's kernel instantiations).
#pragma once

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>

#include "bf16.h"
#include "kernels.h"
#include "vec.h"
#include "weight_types.h"

namespace umt5_fast {
namespace kernels {
namespace {

// Calls body(offset, lanes) for consecutive vectors covering [0, n); only the last may be partial.
template <CpuIsa ISA, class Body>
inline void for_each_vector(int64_t n, Body&& body) {
  constexpr int W = Vec<ISA>::width;
  int64_t i = 0;
  for (; i + W <= n; i += W) body(i, W);
  if (i < n) body(i, static_cast<int>(n - i));
}

template <CpuIsa ISA>
inline typename Vec<ISA>::type load_n(const float* p, int lanes) {
  using V = Vec<ISA>;
  return lanes == V::width ? V::load(p) : V::load_partial(p, lanes);
}

template <CpuIsa ISA>
inline void store_n(float* p, typename Vec<ISA>::type x, int lanes) {
  using V = Vec<ISA>;
  if (lanes == V::width)
    V::store(p, x);
  else
    V::store_partial(p, x, lanes);
}

// The same for half-precision values (bf16 bits in uint16_t, or Fp16): widened on load (the rest
// of the vector 0), rounded on store (nearest even); a partial vector goes through a whole one, so
// that every value is converted by the vector instruction.
template <typename T>
constexpr bool kHalfPrecision = std::is_same_v<T, uint16_t> || std::is_same_v<T, Fp16>;

template <CpuIsa ISA, typename Half, std::enable_if_t<kHalfPrecision<Half>, int> = 0>
inline typename Vec<ISA>::type load_n(const Half* p, int lanes) {
  using V = Vec<ISA>;
  if (lanes == V::width) return V::load_weights(p);
  Half padded[V::width] = {};
  std::copy(p, p + lanes, padded);
  return V::load_weights(padded);
}

template <CpuIsa ISA, typename Half, std::enable_if_t<kHalfPrecision<Half>, int> = 0>
inline void store_n(Half* p, typename Vec<ISA>::type x, int lanes) {
  using V = Vec<ISA>;
  if (lanes == V::width) return V::store_rounded(p, x);
  Half rounded[V::width];
  V::store_rounded(rounded, x);
  std::copy(rounded, rounded + lanes, p);
}

// Horizontal sums of N accumulators, four at a time.
template <CpuIsa ISA, int N>
inline void reduce_all(const typename Vec<ISA>::type* acc, float* sums) {
  static_assert(N % 4 == 0, "accumulators come in groups of four");
  for (int i = 0; i < N; i += 4) Vec<ISA>::reduce4(acc + i, sums + i);
}

// ---------------------------------------------------------------------------------------------
// Attention

// out[r * C + c] = q_rows[r] . k_rows[c] over dim floats. q rows are zero-padded to kPad (read
// whole vectors); k rows (fp32, or bf16 / fp16 widened on load) are read exactly.
template <CpuIsa ISA, int R, int C, typename KV>
inline void dot_products(const float* const* q_rows, const KV* const* k_rows, int dim,
                         float* out) {
  using V = Vec<ISA>;
  constexpr int W = V::width;
  typename V::type acc[R * C], k[C];
  for (auto& a : acc) a = V::zero();
  int d = 0;
  for (; d + W <= dim; d += W) {
    for (int c = 0; c < C; ++c) k[c] = load_n<ISA>(k_rows[c] + d, W);
    for (int r = 0; r < R; ++r) {
      const auto q = V::load(q_rows[r] + d);
      for (int c = 0; c < C; ++c) acc[r * C + c] = V::fma(q, k[c], acc[r * C + c]);
    }
  }
  if (d < dim) {
    for (int c = 0; c < C; ++c) k[c] = load_n<ISA>(k_rows[c] + d, dim - d);
    for (int r = 0; r < R; ++r) {
      const auto q = V::load(q_rows[r] + d);
      for (int c = 0; c < C; ++c) acc[r * C + c] = V::fma(q, k[c], acc[r * C + c]);
    }
  }
  reduce_all<ISA, R * C>(acc, out);
}

// Raw scores of one query row against keys [0, num_keys) of k, eight keys at a time
// (scores past num_keys are junk that softmax_step overwrites).
template <CpuIsa ISA, typename KV>
inline void score_row(const float* q_scaled, const KV* k, int64_t k_row_stride,
                      int num_keys, int dim, float* scores) {
  for (int c0 = 0; c0 < num_keys; c0 += 8) {
    const KV* keys[8];  // keys past the tile repeat its last key
    for (int c = 0; c < 8; ++c) keys[c] = k + std::min(c0 + c, num_keys - 1) * k_row_stride;
    dot_products<ISA, 1, 8>(&q_scaled, keys, dim, scores + c0);
  }
}

// Multi-row blocks work on transposed tiles, scores_t[key][row] (kAttentionMaxRows floats per
// key): one vector holds one key's scores for W consecutive rows. Q K^T then needs no horizontal
// sums (each K entry is broadcast against a row of Q^T), and the online softmax runs with rows in
// lanes: its max and sum are elementwise over keys.
constexpr int kRowStride = kAttentionMaxRows;

// scores_t[c][r] = q row r . key c for RV vectors of rows; q_t is [dim][kRowStride].
template <CpuIsa ISA, int RV, int KG>
inline void score_tile_transposed(const float* q_t, const float* k, int64_t k_row_stride,
                                  int num_keys, int dim, float* scores_t) {
  using V = Vec<ISA>;
  constexpr int W = V::width;
  for (int c0 = 0; c0 < num_keys; c0 += KG) {
    const float* keys[KG];  // keys past the tile repeat its last key; their scores are not stored
    for (int g = 0; g < KG; ++g) keys[g] = k + std::min(c0 + g, num_keys - 1) * k_row_stride;
    typename V::type acc[KG][RV];
    for (auto& key_acc : acc)
      for (auto& a : key_acc) a = V::zero();
    for (int d = 0; d < dim; ++d) {
      typename V::type q[RV];
      for (int v = 0; v < RV; ++v) q[v] = V::load(q_t + d * kRowStride + v * W);
      for (int g = 0; g < KG; ++g) {
        const auto key_entry = V::set1(keys[g][d]);
        for (int v = 0; v < RV; ++v) acc[g][v] = V::fma(key_entry, q[v], acc[g][v]);
      }
    }
    for (int g = 0; g < KG && c0 + g < num_keys; ++g)
      for (int v = 0; v < RV; ++v) V::store(scores_t + (c0 + g) * kRowStride + v * W, acc[g][v]);
  }
}

// exp(score - running max) to fp32 accuracy (Vec::exp, Cephes expf).
template <CpuIsa ISA>
struct ExpOfShifted {
  typename Vec<ISA>::type operator()(typename Vec<ISA>::type score, typename Vec<ISA>::type max) const {
    return Vec<ISA>::exp(Vec<ISA>::sub(score, max));
  }
};

// softmax_step for RV vectors of rows on a transposed tile: position term of (row r, key c) at
// position_term_reversed[r - c], key term key_term[c]. running_max, running_sum and rescale hold
// one float per row. The probabilities, exp_of_shifted(score, running max), go to emit(c, v, p of
// key c, p of key c + 1, whether key c + 1 is in the tile (else its p is 0)) for even c; by
// default, in place of the scores.
template <CpuIsa ISA, int RV, class Emit, class ExpFn = ExpOfShifted<ISA>>
inline void softmax_step_transposed(float* scores_t, int num_keys,
                                    const float* position_term_reversed, const float* key_term,
                                    float* running_max, float* running_sum, float* rescale,
                                    Emit emit, ExpFn exp_of_shifted = {}) {
  using V = Vec<ISA>;
  constexpr int W = V::width;
  typename V::type tile_max[RV];
  for (auto& m : tile_max) m = V::set1(-std::numeric_limits<float>::infinity());
  for (int c = 0; c < num_keys; ++c) {
    float* row = scores_t + c * kRowStride;
    for (int v = 0; v < RV; ++v) {
      auto s = V::load(row + v * W);
      if (position_term_reversed) s = V::add(s, V::load(position_term_reversed + v * W - c));
      // A padded key scores kMaskedScore even where the position term masked it too; a NaN
      // score stays NaN (second operand of max), as in eager attention.
      if (key_term) s = V::max(V::set1(kMaskedScore), V::add(s, V::set1(key_term[c])));
      V::store(row + v * W, s);
      tile_max[v] = V::max(tile_max[v], s);
    }
  }
  typename V::type new_max[RV], sum[RV];
  for (int v = 0; v < RV; ++v) {
    const auto old_max = V::load(running_max + v * W);
    new_max[v] = V::max(old_max, tile_max[v]);
    V::store(rescale + v * W, V::exp(V::sub(old_max, new_max[v])));  // 0 on the first tile
    V::store(running_max + v * W, new_max[v]);
    sum[v] = V::zero();
  }
  for (int c = 0; c < num_keys; c += 2) {
    const bool has_high = c + 1 < num_keys;
    for (int v = 0; v < RV; ++v) {
      const auto low = exp_of_shifted(V::load(scores_t + c * kRowStride + v * W), new_max[v]);
      sum[v] = V::add(sum[v], low);
      auto high = V::zero();
      if (has_high) {
        high = exp_of_shifted(V::load(scores_t + (c + 1) * kRowStride + v * W), new_max[v]);
        sum[v] = V::add(sum[v], high);
      }
      emit(c, v, low, high, has_high);
    }
  }
  for (int v = 0; v < RV; ++v)
    V::store(running_sum + v * W,
             V::fma(V::load(running_sum + v * W), V::load(rescale + v * W), sum[v]));
}

template <CpuIsa ISA, int RV>
inline void softmax_step_transposed(float* scores_t, int num_keys,
                                    const float* position_term_reversed, const float* key_term,
                                    float* running_max, float* running_sum, float* rescale) {
  using V = Vec<ISA>;
  softmax_step_transposed<ISA, RV>(
      scores_t, num_keys, position_term_reversed, key_term, running_max, running_sum, rescale,
      [scores_t](int c, int v, typename V::type low, typename V::type high, bool has_high) {
        V::store(scores_t + c * kRowStride + v * V::width, low);
        if (has_high) V::store(scores_t + (c + 1) * kRowStride + v * V::width, high);
      });
}

// Online-softmax step of one row: adds the position and key terms to the raw scores, turns them
// into exp(score - running max) in place, and updates the running max and sum. Returns the
// factor by which the row's earlier accumulation must be rescaled.
template <CpuIsa ISA>
inline float softmax_step(float* scores, int num_keys, const float* position_term,
                          const float* key_term, float& running_max, float& running_sum) {
  using V = Vec<ISA>;
  constexpr int W = V::width;
  const int padded_keys = static_cast<int>(round_up(num_keys, W));
  auto tile_max = V::set1(-std::numeric_limits<float>::infinity());
  for (int c = 0; c < padded_keys; c += W) {
    auto s = V::load(scores + c);
    if (position_term) s = V::add(s, V::load(position_term + c));
    // A padded key scores kMaskedScore even where the position term masked it too; a NaN
    // score stays NaN (second operand of max), as in eager attention.
    if (key_term) s = V::max(V::set1(kMaskedScore), V::add(s, V::load(key_term + c)));
    V::store(scores + c, s);
  }
  for (int c = num_keys; c < padded_keys; ++c) scores[c] = -std::numeric_limits<float>::infinity();
  for (int c = 0; c < padded_keys; c += W) tile_max = V::max(tile_max, V::load(scores + c));
  const float new_max = std::max(running_max, V::reduce_max(tile_max));
  const float rescale = std::exp(running_max - new_max);  // 0 on the first tile (max = -inf)
  auto sum = V::zero();
  const auto shift = V::set1(new_max);
  for (int c = 0; c < padded_keys; c += W) {
    const auto p = V::exp(V::sub(V::load(scores + c), shift));
    V::store(scores + c, p);
    sum = V::add(sum, p);
  }
  running_max = new_max;
  running_sum = running_sum * rescale + V::reduce_sum(sum);
  return rescale;
}

// acc[r][d0 .. d0 + NV vectors) = acc * rescale[r] + sum_c probs[r][c] * v_c for R rows; the
// last vector covers `last_lanes` lanes when kPartial (acc rows are padded, V rows are not). V rows:
// fp32, or bf16 / fp16 widened on load.
template <CpuIsa ISA, int R, int NV, bool kPartial, typename KV>
inline void accumulate_values(const float* probs, int64_t prob_row_stride, int64_t prob_key_stride,
                              const float* rescale, const KV* v, int64_t v_row_stride,
                              int num_keys, int d0, int last_lanes, float* acc, int64_t acc_stride) {
  using V = Vec<ISA>;
  constexpr int W = V::width;
  typename V::type sums[R][NV];
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < NV; ++i)
      sums[r][i] = V::mul(V::load(acc + r * acc_stride + d0 + i * W), V::set1(rescale[r]));
  for (int c = 0; c < num_keys; ++c) {
    const KV* v_row = v + c * v_row_stride + d0;
    typename V::type values[NV];
    for (int i = 0; i < NV; ++i) values[i] = load_n<ISA>(v_row + i * W, kPartial && i == NV - 1 ? last_lanes : W);
    for (int r = 0; r < R; ++r) {
      const auto p = V::set1(probs[r * prob_row_stride + c * prob_key_stride]);
      for (int i = 0; i < NV; ++i) sums[r][i] = V::fma(p, values[i], sums[r][i]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < NV; ++i) V::store(acc + r * acc_stride + d0 + i * W, sums[r][i]);
}

// accumulate_values over head_dim columns [d, dim): NV vectors at a time, then NV / 2, ... 1,
// then the partial vector, so every vector width keeps as many accumulators as the row allows.
template <CpuIsa ISA, int R, int NV, typename KV>
inline void accumulate_values_all(const float* probs, int64_t prob_row_stride,
                                  int64_t prob_key_stride, const float* rescale, const KV* v,
                                  int64_t v_row_stride, int num_keys, int d, int dim, float* acc,
                                  int64_t acc_stride) {
  constexpr int W = Vec<ISA>::width;
  for (; d + NV * W <= dim; d += NV * W)
    accumulate_values<ISA, R, NV, false>(probs, prob_row_stride, prob_key_stride, rescale, v,
                                         v_row_stride, num_keys, d, W, acc, acc_stride);
  if constexpr (NV > 1) {
    accumulate_values_all<ISA, R, NV / 2>(probs, prob_row_stride, prob_key_stride, rescale, v,
                                          v_row_stride, num_keys, d, dim, acc, acc_stride);
  } else if (d < dim) {
    accumulate_values<ISA, R, 1, true>(probs, prob_row_stride, prob_key_stride, rescale, v,
                                       v_row_stride, num_keys, d, dim - d, acc, acc_stride);
  }
}

// ---------------------------------------------------------------------------------------------
// Activations (the formulas of umt5_fast.ops.eager.ACTIVATIONS)

template <CpuIsa ISA, Activation kActivation>
inline typename Vec<ISA>::type activate(typename Vec<ISA>::type x) {
  using V = Vec<ISA>;
  if constexpr (kActivation == Activation::gelu_tanh) {  // transformers' NewGELU
    const auto inner = V::fma(V::set1(0.044715f), V::mul(V::mul(x, x), x), x);
    const auto t = V::tanh(V::mul(V::set1(0.7978845608028654f), inner));
    return V::mul(V::mul(V::set1(0.5f), x), V::add(V::set1(1.0f), t));
  } else if constexpr (kActivation == Activation::gelu_erf) {
    const auto e = V::erf(V::mul(x, V::set1(0.70710678118654752f)));
    return V::mul(V::mul(x, V::set1(0.5f)), V::add(V::set1(1.0f), e));
  } else if constexpr (kActivation == Activation::relu) {
    return V::max(V::zero(), x);  // NaN stays NaN (second operand), as torch.relu
  } else {  // silu
    return V::div(x, V::add(V::set1(1.0f), V::exp(V::sub(V::zero(), x))));
  }
}

template <CpuIsa ISA, Activation kActivation, typename T>
void gated_activation_rows_as(const T* a, int64_t a_row_stride, const T* b, int64_t b_row_stride,
                              T* out, int64_t out_row_stride, int64_t rows, int64_t cols) {
  using V = Vec<ISA>;
  for (int64_t row = 0; row < rows; ++row) {
    const T* a_row = a + row * a_row_stride;
    const T* b_row = b ? b + row * b_row_stride : nullptr;
    T* out_row = out + row * out_row_stride;
    for_each_vector<ISA>(cols, [&](int64_t i, int lanes) {
      auto h = activate<ISA, kActivation>(load_n<ISA>(a_row + i, lanes));
      if (b_row) h = V::mul(h, load_n<ISA>(b_row + i, lanes));
      store_n<ISA>(out_row + i, h, lanes);
    });
  }
}

// ---------------------------------------------------------------------------------------------
// Weight-only linear

// sums[m * NR + n] = x row (m0 + m) . weight row n, for MR x rows and NR weight rows: each
// widened weight vector is reused MR times, each x vector NR times.
//
// The NR rows are read in an interleaved K-byte stride that the hardware prefetcher follows
// poorly, so the loop also prefetches `prefetch` (the next block's rows, contiguous) a slice per
// step: streaming a large weight matrix then runs at memory bandwidth instead of latency. The
// prefetch goes to L2 only (locality 1, prefetcht2): into L1 it streamed an LM head ~25% slower on
// Zen 4, each weight line being read once anyway.
template <CpuIsa ISA, typename WeightT, int MR, int NR>
inline void linear_dot_products(const float* x, int64_t in_features, const WeightT* const* w_rows,
                                const char* prefetch, float* sums) {
  using V = Vec<ISA>;
  constexpr int W = V::width;
  constexpr int kAcc = (MR * NR + 3) / 4 * 4;
  constexpr int kPrefetchBytesPerStep = NR * W * static_cast<int>(sizeof(WeightT));
  typename V::type acc[kAcc], w[NR];
  for (auto& a : acc) a = V::zero();
  int64_t k = 0;
  for (; k + W <= in_features; k += W) {
    if (prefetch) {
      for (int b = 0; b < kPrefetchBytesPerStep; b += 64) __builtin_prefetch(prefetch + b, 0, 1);
      prefetch += kPrefetchBytesPerStep;
    }
    for (int n = 0; n < NR; ++n) w[n] = V::load_weights(w_rows[n] + k);
    for (int m = 0; m < MR; ++m) {
      const auto xv = V::load(x + m * in_features + k);
      for (int n = 0; n < NR; ++n) acc[m * NR + n] = V::fma(xv, w[n], acc[m * NR + n]);
    }
  }
  float reduced[kAcc];
  reduce_all<ISA, kAcc>(acc, reduced);
  for (int i = 0; i < MR * NR; ++i) sums[i] = reduced[i];
  for (; k < in_features; ++k)  // fewer than W left
    for (int m = 0; m < MR; ++m)
      for (int n = 0; n < NR; ++n)
        sums[m * NR + n] += x[m * in_features + k] * widen_weight(w_rows[n][k]);
}

template <CpuIsa ISA, typename WeightT, int MR>
inline void linear_row_block(const LinearProblem<WeightT>& p, int64_t m0, int64_t n_begin,
                             int64_t n_end) {
  // Weight rows per block: at least 8 independent accumulators hide the FMA latency (3 chains
  // left one x row at 0.75 vectors a cycle), and the accumulators and operands fit the vector
  // registers: MR * NR <= 24 of AVX-512's 32, else MR * NR <= 12 of 16.
  constexpr int NR = ISA == CpuIsa::avx512 ? (MR <= 2 ? 8 : 6)
                                           : (MR == 1 ? 8 : MR == 2 ? 6 : MR == 3 ? 4 : 3);
  const int64_t K = p.in_features, N = p.out_features;
  for (int64_t n0 = n_begin; n0 < n_end; n0 += NR) {
    const WeightT* w_rows[NR];
    for (int n = 0; n < NR; ++n)  // rows past n_end repeat the last one; their sums are dropped
      w_rows[n] = p.weight + std::min(n0 + n, n_end - 1) * K;
    // The next block of the matrix, wherever it lies (another chunk, another thread's range).
    // Only the first row block fetches: the others find the block in cache.
    const bool next_block_exists = m0 == 0 && n0 + 2 * NR <= N;
    const char* next_block =
        next_block_exists ? reinterpret_cast<const char*>(p.weight + (n0 + NR) * K) : nullptr;
    float sums[MR * NR];
    linear_dot_products<ISA, WeightT, MR, NR>(p.x + m0 * K, K, w_rows, next_block, sums);
    for (int m = 0; m < MR; ++m)
      for (int n = 0; n < NR && n0 + n < n_end; ++n) {
        const int64_t at = (m0 + m) * N + n0 + n;
        float y = sums[m * NR + n];
        if (p.scale) y *= p.scale[n0 + n];
        if (p.residual) y += p.residual[at];
        p.y[at] = y;
      }
  }
}

// Rows of fp32 K and V for keys [j0, j0 + num_keys) of a block.
struct KeyValueTile {
  const float* k;
  int64_t k_row_stride;
  const float* v;
  int64_t v_row_stride;
};

template <CpuIsa ISA, typename Half>
inline void widen_rows(const void* rows, int64_t row_stride, int64_t first_row, int num_rows, int dim,
                       float* out, int64_t out_row_stride) {
  const Half* row = static_cast<const Half*>(rows) + first_row * row_stride;
  for (int r = 0; r < num_rows; ++r, row += row_stride) convert_values<ISA>(row, out + r * out_row_stride, dim);
}

// The block's K and V rows themselves when they are fp32; half-precision ones widened into
// `widened` ([2][kAttentionKeyTile][round_up(dim, kPad)] floats), while they are in cache anyway:
// the transposed score tiles broadcast single K entries, which are cheaper widened once per tile.
template <CpuIsa ISA>
inline KeyValueTile key_value_tile(const AttentionBlock& b, int64_t j0, int num_keys, float* widened) {
  if (b.kv_element == AttentionElement::f32)
    return {static_cast<const float*>(b.k) + j0 * b.k_row_stride, b.k_row_stride,
            static_cast<const float*>(b.v) + j0 * b.v_row_stride, b.v_row_stride};
  const int64_t stride = round_up(b.head_dim, kPad);
  float* k = widened;
  float* v = widened + kAttentionKeyTile * stride;
  const auto widen = b.kv_element == AttentionElement::bf16 ? &widen_rows<ISA, uint16_t> : &widen_rows<ISA, Fp16>;
  widen(b.k, b.k_row_stride, j0, num_keys, b.head_dim, k, stride);
  widen(b.v, b.v_row_stride, j0, num_keys, b.head_dim, v, stride);
  return {k, stride, v, stride};
}

// A block of several rows, RV vectors of them (rows past num_rows are zero queries whose outputs
// are dropped): transposed score tiles, then P V with four rows per pass.
template <CpuIsa ISA, int RV>
void attention_rows(const AttentionBlock& b, float* scratch) {
  using V = Vec<ISA>;
  constexpr int W = V::width;
  // Keys per score pass: KG * RV accumulators fill the registers (32 vectors on AVX-512, else 16)
  constexpr int KG = std::max(1, (ISA == CpuIsa::avx512 ? 24 : 12) / RV);
  constexpr int kRows = RV * W;
  const int dim = b.head_dim;
  const int64_t dim_stride = round_up(dim, kPad);
  float* q_t = scratch;                                // [dim][kRowStride], scaled, zero padded
  float* acc = q_t + kRowStride * dim_stride;           // [kRows][dim_stride]
  float* scores_t = acc + kRowStride * dim_stride;      // [kAttentionKeyTile][kRowStride]
  float* running_max = scores_t + kRowStride * kAttentionKeyTile;
  float* running_sum = running_max + kRowStride;
  float* rescale = running_sum + kRowStride;
  float* widened_kv = rescale + kRowStride;  // half-precision K/V tiles

  for (int d = 0; d < dim; ++d)
    for (int r = 0; r < kRows; ++r)
      q_t[d * kRowStride + r] = r < b.num_rows ? b.q[r * b.q_row_stride + d] * b.scale : 0.0f;
  std::fill(acc, acc + kRows * dim_stride, 0.0f);
  std::fill(running_max, running_max + kRows, -std::numeric_limits<float>::infinity());
  std::fill(running_sum, running_sum + kRows, 0.0f);

  for (int64_t j0 = b.key_begin; j0 < b.key_end; j0 += kAttentionKeyTile) {
    const int num_keys = static_cast<int>(std::min<int64_t>(kAttentionKeyTile, b.key_end - j0));
    const KeyValueTile tile = key_value_tile<ISA>(b, j0, num_keys, widened_kv);
    score_tile_transposed<ISA, RV, KG>(q_t, tile.k, tile.k_row_stride, num_keys, dim, scores_t);
    softmax_step_transposed<ISA, RV>(
        scores_t, num_keys, b.position_term_reversed ? b.position_term_reversed - j0 : nullptr,
        b.key_term ? b.key_term + j0 : nullptr, running_max, running_sum, rescale);
    for (int r0 = 0; r0 < b.num_rows; r0 += 4)  // 4 x NV accumulators fit the registers
      accumulate_values_all<ISA, 4, ISA == CpuIsa::avx512 ? 4 : 2>(scores_t + r0, 1, kRowStride, rescale + r0, tile.v,
                                       tile.v_row_stride, num_keys, 0, dim, acc + r0 * dim_stride,
                                       dim_stride);
  }
  for (int r = 0; r < b.num_rows; ++r) {
    const auto inverse_sum = V::set1(1.0f / running_sum[r]);
    const float* acc_row = acc + r * dim_stride;
    float* out_row = b.out + r * b.out_row_stride;
    for_each_vector<ISA>(dim, [&](int64_t d, int lanes) {
      store_n<ISA>(out_row + d, V::mul(V::load(acc_row + d), inverse_sum), lanes);
    });
  }
}

// One query row (decoding, cross-attention of one token): scores in a row, eight keys at a time,
// K and V of KV (fp32, or bf16 / fp16 widened as they are loaded: each element is read once here).
template <CpuIsa ISA, typename KV>
void attention_row(const AttentionBlock& b, float* scratch) {
  using V = Vec<ISA>;
  constexpr int W = V::width;
  const int dim = b.head_dim;
  const int64_t dim_stride = round_up(dim, kPad);
  float* q_scaled = scratch;             // [dim_stride]
  float* acc = q_scaled + dim_stride;    // [dim_stride]
  float* scores = acc + dim_stride;      // [kAttentionKeyTile]
  const KV* k = static_cast<const KV*>(b.k);
  const KV* v = static_cast<const KV*>(b.v);
  float running_max = -std::numeric_limits<float>::infinity(), running_sum = 0.0f;

  // Scale q once here rather than every score; zero padding makes whole-vector reads safe.
  for (int64_t d = 0; d < dim_stride; d += W) {
    const int lanes = static_cast<int>(std::clamp<int64_t>(dim - d, 0, W));
    V::store(q_scaled + d, V::mul(V::load_partial(b.q + d, lanes), V::set1(b.scale)));
    V::store(acc + d, V::zero());
  }
  for (int64_t j0 = b.key_begin; j0 < b.key_end; j0 += kAttentionKeyTile) {
    const int num_keys = static_cast<int>(std::min<int64_t>(kAttentionKeyTile, b.key_end - j0));
    score_row<ISA>(q_scaled, k + j0 * b.k_row_stride, b.k_row_stride, num_keys, dim, scores);
    const float rescale = softmax_step<ISA>(scores, num_keys, b.position_term ? b.position_term + j0 : nullptr,
                                            b.key_term ? b.key_term + j0 : nullptr, running_max,
                                            running_sum);
    // up to eight accumulators: one row has few FMA chains to hide latency
    accumulate_values_all<ISA, 1, 8>(scores, kAttentionKeyTile, 1, &rescale, v + j0 * b.v_row_stride,
                                     b.v_row_stride, num_keys, 0, dim, acc, dim_stride);
  }
  const auto inverse_sum = V::set1(1.0f / running_sum);
  for_each_vector<ISA>(dim, [&](int64_t d, int lanes) {
    store_n<ISA>(b.out + d, V::mul(V::load(acc + d), inverse_sum), lanes);
  });
}

// Dispatches on the vectors of rows a block needs (one instantiation per count up to
// kAttentionMaxRows / W; the portable build always takes the largest).
template <CpuIsa ISA, int RV>
void attention_rows_upto(const AttentionBlock& b, float* scratch) {
  constexpr int W = Vec<ISA>::width;
  if constexpr (RV * W >= kAttentionMaxRows) {
    attention_rows<ISA, RV>(b, scratch);
  } else {
    if (b.num_rows <= RV * W) return attention_rows<ISA, RV>(b, scratch);
    attention_rows_upto<ISA, RV + 1>(b, scratch);
  }
}

}  // namespace

// ---------------------------------------------------------------------------------------------

template <CpuIsa ISA>
void attention_block(const AttentionBlock& b, float* scratch) {
  if (b.num_rows == 1) {
    if (b.kv_element == AttentionElement::bf16) return attention_row<ISA, uint16_t>(b, scratch);
    if (b.kv_element == AttentionElement::f16) return attention_row<ISA, Fp16>(b, scratch);
    return attention_row<ISA, float>(b, scratch);
  }
  constexpr int W = Vec<ISA>::width;
  attention_rows_upto<ISA, W == 1 ? kAttentionMaxRows : 1>(b, scratch);
}

// Lane-wise sums of h^2 over a row (fp32, or bf16 / fp16 widened), and rsqrt(mean + eps) of them in
// every lane: the RMSNorm kernels' variance, one order of summation for both.
template <CpuIsa ISA, typename T>
inline typename Vec<ISA>::type sum_of_squares(const T* h, int64_t dim) {
  auto sum = Vec<ISA>::zero();
  for_each_vector<ISA>(dim, [&](int64_t i, int lanes) {
    const auto v = load_n<ISA>(h + i, lanes);
    sum = Vec<ISA>::fma(v, v, sum);
  });
  return sum;
}

template <CpuIsa ISA>
inline typename Vec<ISA>::type inverse_root_mean(typename Vec<ISA>::type square_sum, int64_t dim, float eps) {
  const float variance = Vec<ISA>::reduce_sum(square_sum) / static_cast<float>(dim);
  return Vec<ISA>::set1(1.0f / std::sqrt(variance + eps));
}

template <CpuIsa ISA>
void rms_norm_rows(const float* x, const float* residual, const float* weight, float eps,
                   float* hidden, float* out, int64_t rows, int64_t dim) {
  using V = Vec<ISA>;
  for (int64_t row = 0; row < rows; ++row) {
    const float* source = x + row * dim;
    auto square_sum = V::zero();
    if (residual) {
      const float* residual_row = residual + row * dim;
      float* hidden_row = hidden + row * dim;
      for_each_vector<ISA>(dim, [&](int64_t i, int lanes) {
        const auto h = V::add(load_n<ISA>(source + i, lanes), load_n<ISA>(residual_row + i, lanes));
        store_n<ISA>(hidden_row + i, h, lanes);
        square_sum = V::fma(h, h, square_sum);
      });
      source = hidden_row;
    } else {
      square_sum = sum_of_squares<ISA>(source, dim);
    }
    const auto inverse_rms = inverse_root_mean<ISA>(square_sum, dim, eps);
    float* out_row = out + row * dim;
    for_each_vector<ISA>(dim, [&](int64_t i, int lanes) {  // eager's order: weight * (h * rsqrt)
      const auto normed = V::mul(load_n<ISA>(source + i, lanes), inverse_rms);
      store_n<ISA>(out_row + i, V::mul(load_n<ISA>(weight + i, lanes), normed), lanes);
    });
  }
}

template <CpuIsa ISA, typename X, typename Half>
void rms_norm_half_rows(const X* x, const Half* weight, float eps, Half* out, int64_t rows, int64_t dim) {
  using V = Vec<ISA>;
  for (int64_t row = 0; row < rows; ++row) {
    const X* source = x + row * dim;
    const auto inverse_rms = inverse_root_mean<ISA>(sum_of_squares<ISA>(source, dim), dim, eps);
    Half* out_row = out + row * dim;
    for_each_vector<ISA>(dim, [&](int64_t i, int lanes) {
      Half normed[V::width];  // h * rsqrt rounded, as transformers casts it to the weight's dtype
      store_n<ISA>(normed, V::mul(load_n<ISA>(source + i, lanes), inverse_rms), lanes);
      store_n<ISA>(out_row + i, V::mul(load_n<ISA>(normed, lanes), load_n<ISA>(weight + i, lanes)), lanes);
    });
  }
}

template <CpuIsa ISA, typename From, typename To>
void convert_values(const From* in, To* out, int64_t n) {
  for_each_vector<ISA>(n, [&](int64_t i, int lanes) { store_n<ISA>(out + i, load_n<ISA>(in + i, lanes), lanes); });
}

template <CpuIsa ISA, typename T>
void gated_activation_rows(Activation activation, const T* a, int64_t a_row_stride, const T* b,
                           int64_t b_row_stride, T* out, int64_t out_row_stride, int64_t rows,
                           int64_t cols) {
  switch (activation) {
#define UMT5_ACTIVATION_CASE(NAME)                                                            \
  case Activation::NAME:                                                                      \
    return gated_activation_rows_as<ISA, Activation::NAME>(a, a_row_stride, b, b_row_stride, \
                                                           out, out_row_stride, rows, cols);
    UMT5_ACTIVATION_CASE(gelu_tanh)
    UMT5_ACTIVATION_CASE(gelu_erf)
    UMT5_ACTIVATION_CASE(relu)
    UMT5_ACTIVATION_CASE(silu)
#undef UMT5_ACTIVATION_CASE
  }
}

// Rows of x in blocks of up to four, so each weight row is read from memory once per chunk of
// columns (the caller keeps chunks small enough to stay in cache) and reused by every x row.
template <CpuIsa ISA, typename WeightT>
void weight_only_linear(const LinearProblem<WeightT>& problem, int64_t n_begin, int64_t n_end) {
  int64_t m0 = 0;
  for (; m0 + 4 <= problem.rows; m0 += 4)
    linear_row_block<ISA, WeightT, 4>(problem, m0, n_begin, n_end);
  switch (problem.rows - m0) {
    case 3: return linear_row_block<ISA, WeightT, 3>(problem, m0, n_begin, n_end);
    case 2: return linear_row_block<ISA, WeightT, 2>(problem, m0, n_begin, n_end);
    case 1: return linear_row_block<ISA, WeightT, 1>(problem, m0, n_begin, n_end);
    default: return;
  }
}

template <CpuIsa ISA>
float exp_sum(const float* x, int64_t n, float shift) {
  using V = Vec<ISA>;
  constexpr int W = V::width;
  const auto s = V::set1(shift);
  typename V::type acc[4] = {V::zero(), V::zero(), V::zero(), V::zero()};  // four chains of adds
  int64_t i = 0;
  for (; i + 4 * W <= n; i += 4 * W)
    for (int j = 0; j < 4; ++j) acc[j] = V::add(acc[j], V::exp(V::sub(V::load(x + i + j * W), s)));
  for (; i + W <= n; i += W) acc[0] = V::add(acc[0], V::exp(V::sub(V::load(x + i), s)));
  float sum = V::reduce_sum(V::add(V::add(acc[0], acc[1]), V::add(acc[2], acc[3])));
  for (; i < n; ++i) sum += std::exp(x[i] - shift);
  return sum;
}

// ---------------------------------------------------------------------------------------------
// Panel form of the weight-only linear (kPanelMinRows+ rows): BLIS's scheme. A chunk of output
// columns is widened once into K-major panels of two vectors' width; then each tile of
// PanelShape::rows x rows times one panel keeps its outputs in 2 * PanelShape::rows accumulators fed
// by broadcast x values, so the FMAs need no horizontal reductions and each loaded weight vector
// serves all the tile's rows. The dot-product kernel above reads each weight vector from L2 once
// per four rows and reduces its accumulators per output: its rate stays near half the FMA peak
// from a few rows on.

template <CpuIsa ISA>
struct PanelShape {
  static constexpr int width = 2 * Vec<ISA>::width;  // columns of a panel
  // x rows of a tile: 2 * rows accumulators, two weight vectors and the broadcast fit the vector
  // registers (32 with AVX-512, 16 with AVX2; the scalar build keeps a few in registers)
  static constexpr int rows = ISA == CpuIsa::avx512 ? 12 : ISA == CpuIsa::avx2 ? 6 : 4;
};

// Widens weight rows [n0, n0 + columns) x [k0, k0 + kc) into panels: panel p holds, for each k,
// the PanelShape::width weights of columns n0 + p * width... contiguously. Columns past n_end
// repeat row n_end - 1 (their outputs are never stored). Vectors of W rows are transposed in
// registers.
template <CpuIsa ISA, typename WeightT>
inline void pack_panels(const WeightT* weight, int64_t K, int64_t n0, int64_t columns, int64_t n_end,
                        int64_t k0, int64_t kc, float* packed) {
  using V = Vec<ISA>;
  constexpr int W = V::width, PW = PanelShape<ISA>::width;
  for (int64_t g = 0; g < columns; g += W) {  // W columns: half a panel
    float* dst = packed + (g / PW) * kc * PW + g % PW;
    const WeightT* rows[W];
    for (int i = 0; i < W; ++i) rows[i] = weight + std::min(n0 + g + i, n_end - 1) * K + k0;
    int64_t k = 0;
    for (; k + W <= kc; k += W) {
      typename V::type block[W];
      for (int i = 0; i < W; ++i) block[i] = V::load_weights(rows[i] + k);
      V::transpose(block);  // block[j]: column k + j of the W rows
      for (int j = 0; j < W; ++j) V::store(dst + (k + j) * PW, block[j]);
    }
    for (; k < kc; ++k)
      for (int i = 0; i < W; ++i) dst[k * PW + i] = widen_weight(rows[i][k]);
  }
}

// One tile: MR x rows (row stride K) times one packed panel over kc values of k. The sums start
// at 0 (first) or from `partial`, and go back to `partial` (not last) or, scaled and with the
// residual added as weight_only_linear does, to y at [m0, n) for the `columns` columns that exist.
template <CpuIsa ISA, int MR, typename WeightT>
inline void panel_tile(const LinearProblem<WeightT>& p, const float* x, int64_t kc, const float* panel,
                       float* partial, int64_t partial_stride, bool first, bool last, int64_t m0, int64_t n,
                       int columns, const char*& ahead, const char* ahead_end) {
  using V = Vec<ISA>;
  constexpr int W = V::width;
  const int64_t K = p.in_features, N = p.out_features;
  typename V::type acc[MR][2];
  for (int m = 0; m < MR; ++m)
    for (int h = 0; h < 2; ++h)
      acc[m][h] = first ? V::zero() : V::load(partial + m * partial_stride + h * W);
  for (int64_t k = 0; k < kc; ++k) {
    if (ahead < ahead_end) {  // a line of the weights the next chunk packs, into L2
      __builtin_prefetch(ahead, 0, 1);
      ahead += 64;
    }
    const auto w0 = V::load(panel + k * 2 * W), w1 = V::load(panel + k * 2 * W + W);
    for (int m = 0; m < MR; ++m) {
      const auto xm = V::set1(x[m * K + k]);
      acc[m][0] = V::fma(xm, w0, acc[m][0]);
      acc[m][1] = V::fma(xm, w1, acc[m][1]);
    }
  }
  if (!last) {
    for (int m = 0; m < MR; ++m)
      for (int h = 0; h < 2; ++h) V::store(partial + m * partial_stride + h * W, acc[m][h]);
    return;
  }
  for (int h = 0; h < 2; ++h) {
    const int lanes = std::min(W, columns - h * W);
    if (lanes <= 0) break;
    const int64_t col = n + h * W;
    for (int m = 0; m < MR; ++m) {
      auto y = acc[m][h];
      if (p.scale) y = V::mul(y, load_n<ISA>(p.scale + col, lanes));
      const int64_t at = (m0 + m) * N + col;
      if (p.residual) y = V::add(y, load_n<ISA>(p.residual + at, lanes));
      store_n<ISA>(p.y + at, y, lanes);
    }
  }
}

template <CpuIsa ISA, typename WeightT>
void panel_linear(const LinearProblem<WeightT>& p, int64_t n_begin, int64_t n_end, float* packed, float* partial) {
  constexpr int PW = PanelShape<ISA>::width, MR = PanelShape<ISA>::rows;
  const int64_t K = p.in_features, M = p.rows;
  const int64_t columns = n_end - n_begin;
  const int64_t padded = (columns + PW - 1) / PW * PW;
  const int64_t k_blocks = std::max<int64_t>(1, (K + kPanelDepth - 1) / kPanelDepth);
  // While the tiles compute, the weight rows of the next chunk (contiguous, whole rows: with one
  // block of k) are prefetched a line per step of k, so that packing them finds them in L2: it
  // runs at memory bandwidth otherwise, without the FMAs that could overlap it.
  const int64_t next_rows = k_blocks == 1 ? std::min(columns, p.out_features - n_end) : 0;
  const char* ahead = reinterpret_cast<const char*>(p.weight + n_end * K);
  const char* const ahead_end = ahead + std::max<int64_t>(next_rows, 0) * K * static_cast<int64_t>(sizeof(WeightT));
  for (int64_t b = 0; b < k_blocks; ++b) {
    const int64_t k0 = K * b / k_blocks, kc = K * (b + 1) / k_blocks - k0;
    pack_panels<ISA>(p.weight, K, n_begin, padded, n_end, k0, kc, packed);
    for (int64_t m0 = 0; m0 < M; m0 += MR) {
      const int rows = static_cast<int>(std::min<int64_t>(MR, M - m0));
      for (int64_t c = 0; c < padded; c += PW) {
        const int valid = static_cast<int>(std::min<int64_t>(PW, columns - c));
        const float* x = p.x + m0 * K + k0;
        float* tile_partial = partial + m0 * padded + c;
        const float* panel = packed + c * kc;
        const bool first = b == 0, last = b == k_blocks - 1;
        switch (rows) {
#define UMT5_PANEL_TILE(R)                                                                             \
  case R:                                                                                              \
    if constexpr (R <= MR)                                                                             \
      panel_tile<ISA, R>(p, x, kc, panel, tile_partial, padded, first, last, m0, n_begin + c, valid, ahead, \
                         ahead_end);                                                                         \
    break;
          UMT5_PANEL_TILE(1) UMT5_PANEL_TILE(2) UMT5_PANEL_TILE(3) UMT5_PANEL_TILE(4) UMT5_PANEL_TILE(5)
          UMT5_PANEL_TILE(6) UMT5_PANEL_TILE(7) UMT5_PANEL_TILE(8) UMT5_PANEL_TILE(9) UMT5_PANEL_TILE(10)
          UMT5_PANEL_TILE(11) UMT5_PANEL_TILE(12)
#undef UMT5_PANEL_TILE
        }
      }
    }
  }
}

template <CpuIsa ISA, typename OutT>
void expand_int8_row(const int8_t* values, int64_t block_stride, const float* scale,
                     int64_t blocks, int64_t block, OutT* out) {
  using V = Vec<ISA>;
  constexpr int W = V::width;
  for (int64_t b = 0; b < blocks; ++b, values += block_stride, out += block) {
    const auto s = V::set1(scale[b]);
    int64_t i = 0;
    for (; i + W <= block; i += W) {
      const auto x = V::mul(V::load_weights(values + i), s);
      if constexpr (std::is_same_v<OutT, float>) V::store(out + i, x); else V::store_rounded(out + i, x);
    }
    for (; i < block; ++i) {
      const float x = static_cast<float>(values[i]) * scale[b];
      if constexpr (std::is_same_v<OutT, float>) out[i] = x; else out[i] = float_to_bf16(x);
    }
  }
}

}  // namespace kernels
}  // namespace umt5_fast

// Every kernel of kernels.h, instantiated for ISA (one use per kernels_<isa>.cpp).
#define UMT5_INSTANTIATE_KERNELS(ISA)                                                          \
  namespace umt5_fast {                                                                       \
  namespace kernels {                                                                         \
  template void attention_block<ISA>(const AttentionBlock&, float*);                          \
  template void rms_norm_rows<ISA>(const float*, const float*, const float*, float, float*,   \
                                   float*, int64_t, int64_t);                                 \
  template void rms_norm_half_rows<ISA>(const uint16_t*, const uint16_t*, float, uint16_t*,  \
                                        int64_t, int64_t);                                    \
  template void rms_norm_half_rows<ISA>(const Fp16*, const Fp16*, float, Fp16*, int64_t,      \
                                        int64_t);                                             \
  template void rms_norm_half_rows<ISA>(const float*, const Fp16*, float, Fp16*, int64_t,     \
                                        int64_t);                                             \
  template void convert_values<ISA>(const uint16_t*, float*, int64_t);                        \
  template void convert_values<ISA>(const float*, uint16_t*, int64_t);                        \
  template void convert_values<ISA>(const Fp16*, float*, int64_t);                            \
  template void convert_values<ISA>(const float*, Fp16*, int64_t);                            \
  template float exp_sum<ISA>(const float*, int64_t, float);                                  \
  template void gated_activation_rows<ISA>(Activation, const float*, int64_t, const float*,   \
                                           int64_t, float*, int64_t, int64_t, int64_t);       \
  template void gated_activation_rows<ISA>(Activation, const uint16_t*, int64_t,              \
                                           const uint16_t*, int64_t, uint16_t*, int64_t,      \
                                           int64_t, int64_t);                                 \
  template void gated_activation_rows<ISA>(Activation, const Fp16*, int64_t, const Fp16*,     \
                                           int64_t, Fp16*, int64_t, int64_t, int64_t);        \
  template void weight_only_linear<ISA, int8_t>(const LinearProblem<int8_t>&, int64_t,        \
                                                int64_t);                                     \
  template void weight_only_linear<ISA, uint16_t>(const LinearProblem<uint16_t>&, int64_t,    \
                                                  int64_t);                                   \
  template void weight_only_linear<ISA, Fp16>(const LinearProblem<Fp16>&, int64_t, int64_t);    \
  template void weight_only_linear<ISA, float>(const LinearProblem<float>&, int64_t, int64_t);  \
  template void panel_linear<ISA, int8_t>(const LinearProblem<int8_t>&, int64_t, int64_t, float*, float*); \
  template void panel_linear<ISA, uint16_t>(const LinearProblem<uint16_t>&, int64_t, int64_t, float*,     \
                                            float*);                                                      \
  template void panel_linear<ISA, Fp16>(const LinearProblem<Fp16>&, int64_t, int64_t, float*, float*);     \
  template void panel_linear<ISA, float>(const LinearProblem<float>&, int64_t, int64_t, float*, float*);   \
  template void expand_int8_row<ISA, float>(const int8_t*, int64_t, const float*, int64_t,    \
                                            int64_t, float*);                                 \
  template void expand_int8_row<ISA, uint16_t>(const int8_t*, int64_t, const float*, int64_t, \
                                               int64_t, uint16_t*);                           \
  }                                                                                           \
  }
