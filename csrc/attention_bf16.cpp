// Fused attention on bf16 q, k, v (bf16 models) with AVX512-BF16's vdpbf16ps, which multiplies
// pairs of bf16 numbers and adds both products to an fp32 lane: twice the multiply rate of fp32
// FMAs. The tiling is the fp32 multi-row kernel's (kernels_impl.h): transposed score tiles with
// query rows in lanes, and its online softmax in fp32. The two products take pairs:
// - q k^T pairs consecutive dims: the block's q is packed as [D / 2][rows] (one pair per row and
//   lane), and each key's pair is broadcast straight from its row, so K is read in place;
// - p v pairs consecutive keys: p (exp(score - running max), rounded to bf16, as transformers'
//   bf16 attention rounds its softmax) as [keys / 2][rows], against V packed once per call as
//   [keys / 2][D] by pack_value_pairs.
//
// Compiled with kernels_avx512.cpp's flags (so the shared Vec<avx512> code is identical in both
// objects); only the functions marked kBf16Target below use AVX512-BF16/BW/VL, and run_attention
// calls them only where cpu_supports_bf16_attention().
#include "attention_bf16.h"

#include <immintrin.h>

#include <algorithm>
#include <cstring>

#include "vec_avx512.h"
#include "attention_bf16_pairs.h"

namespace umt5_fast {
namespace {

// Keys per online-softmax step, twice the fp32 kernels' (K is read in place and V as pairs, so a
// tile needs half the bytes). Each step rescales the accumulator and updates the running max and
// sum: against 64-key steps that costs a quarter as much per key (1 x 6 x 4096 x 64 on a Zen 4:
// 77 -> 72 ms; 512 keys gain nothing more).
constexpr int kKeyTile = 256;
using namespace bf16_pairs;

UMT5_FAST_BF16_TARGET inline __m512 add_pair_products(__m512 acc, __m512i a, __m512i b) {
  return _mm512_dpbf16_ps(acc, (__m512bh)a, (__m512bh)b);
}

// acc[g][v] += q rows . key g over dims (2i, 2i + 1); kWhole false: an odd head_dim's last dim
// alone (its key pair is (last dim, 0)).
template <int RV, int KG, bool kWhole>
UMT5_FAST_BF16_TARGET __attribute__((always_inline)) inline void add_dim_pair(
    __m512 (&acc)[KG][RV], const uint32_t* q_pairs, const uint16_t* const* keys, int i) {
  __m512i q[RV];
  for (int v = 0; v < RV; ++v) q[v] = _mm512_loadu_si512(q_pairs + i * kRowStride + v * kLanes);
  for (int g = 0; g < KG; ++g) {
    uint32_t key_pair = keys[g][2 * i];
    if constexpr (kWhole) std::memcpy(&key_pair, keys[g] + 2 * i, sizeof(key_pair));
    const __m512i broadcast = _mm512_set1_epi32(static_cast<int>(key_pair));
    for (int v = 0; v < RV; ++v) acc[g][v] = add_pair_products(acc[g][v], q[v], broadcast);
  }
}

// scores_t[c][r] = q row r . key (first_key + c) for RV vectors of rows, KG keys at a time.
template <int RV, int KG>
UMT5_FAST_BF16_TARGET void score_tile(const AttentionBlockBf16& b, const uint32_t* q_pairs,
                                      int64_t first_key, int num_keys, float* scores_t) {
  const int full_pairs = b.head_dim / 2;
  for (int c0 = 0; c0 < num_keys; c0 += KG) {
    const uint16_t* keys[KG];  // keys past the tile repeat its last key; their scores are not stored
    for (int g = 0; g < KG; ++g)
      keys[g] = b.k + (first_key + std::min(c0 + g, num_keys - 1)) * b.k_row_stride;
    __m512 acc[KG][RV];
    for (auto& key_acc : acc)
      for (auto& a : key_acc) a = _mm512_setzero_ps();
    for (int i = 0; i < full_pairs; ++i) add_dim_pair<RV, KG, true>(acc, q_pairs, keys, i);
    if (b.head_dim % 2) add_dim_pair<RV, KG, false>(acc, q_pairs, keys, full_pairs);
    for (int g = 0; g < KG && c0 + g < num_keys; ++g)
      for (int v = 0; v < RV; ++v)
        _mm512_storeu_ps(scores_t + (c0 + g) * kRowStride + v * kLanes, acc[g][v]);
  }
}

// acc[r][d0 .. d0 + NV vectors) = acc * rescale[r] + sum over key pairs of p v, for R rows.
template <int R, int NV>
UMT5_FAST_BF16_TARGET void accumulate_value_pairs(const uint32_t* p_pairs, const float* rescale,
                                                  const uint32_t* v_pairs, int64_t d_padded,
                                                  int pairs, int64_t d0, float* acc) {
  __m512 sums[R][NV];
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < NV; ++i)
      sums[r][i] = _mm512_mul_ps(_mm512_loadu_ps(acc + r * d_padded + d0 + i * kLanes),
                                 _mm512_set1_ps(rescale[r]));
  for (int c = 0; c < pairs; ++c) {
    __m512i values[NV];
    for (int i = 0; i < NV; ++i)
      values[i] = _mm512_loadu_si512(v_pairs + c * d_padded + d0 + i * kLanes);
    for (int r = 0; r < R; ++r) {
      const __m512i p = _mm512_set1_epi32(static_cast<int>(p_pairs[c * kRowStride + r]));
      for (int i = 0; i < NV; ++i) sums[r][i] = add_pair_products(sums[r][i], values[i], p);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < NV; ++i) _mm512_storeu_ps(acc + r * d_padded + d0 + i * kLanes, sums[r][i]);
}

// accumulate_value_pairs over the padded head dims from d: four vectors at a time, then fewer.
template <int R, int NV>
void accumulate_value_pairs_all(const uint32_t* p_pairs, const float* rescale,
                                const uint32_t* v_pairs, int64_t d_padded, int pairs, int64_t d,
                                float* acc) {
  for (; d + NV * kLanes <= d_padded; d += NV * kLanes)
    accumulate_value_pairs<R, NV>(p_pairs, rescale, v_pairs, d_padded, pairs, d, acc);
  if constexpr (NV > 1)
    accumulate_value_pairs_all<R, NV / 2>(p_pairs, rescale, v_pairs, d_padded, pairs, d, acc);
}

UMT5_FAST_BF16_TARGET void store_rows(const AttentionBlockBf16& b, const float* acc,
                                      const float* running_sum) {
  for (int r = 0; r < b.num_rows; ++r) {
    const __m512 inverse_sum = _mm512_set1_ps(1.0f / running_sum[r]);
    for (int d = 0; d < b.head_dim; d += kLanes) {
      const int lanes = std::min(kLanes, b.head_dim - d);
      const __m512 x = _mm512_mul_ps(_mm512_loadu_ps(acc + r * b.d_padded + d), inverse_sum);
      _mm256_mask_storeu_epi16(b.out + r * b.out_row_stride + d,
                               static_cast<__mmask16>((1u << lanes) - 1),
                               (__m256i)_mm512_cvtneps_pbh(x));
    }
  }
}

int64_t query_pair_rows(int head_dim) { return (head_dim + 1) / 2; }

template <int RV>
void attention_rows_bf16(const AttentionBlockBf16& b, float* scratch_floats) {
  // Keys per score pass: 16 or 8, so passes tile a step's keys exactly; 16 accumulators.
  constexpr int KG = 16 / RV;
  static_assert(kKeyTile % KG == 0, "score passes cover a key tile exactly");
  const PairScratch s(scratch_floats, query_pair_rows(b.head_dim), b.d_padded, kKeyTile);
  pack_query_pairs(b, static_cast<int>(query_pair_rows(b.head_dim)), s.q_pairs);

  // Tiles start at even keys, so V pairs are whole: a key before key_begin is padding, which its
  // key term masks to probability 0.
  for (int64_t j0 = b.key_begin / 2 * 2; j0 < b.key_end; j0 += kKeyTile) {
    const int num_keys = static_cast<int>(std::min<int64_t>(kKeyTile, b.key_end - j0));
    score_tile<RV, KG>(b, s.q_pairs, j0, num_keys, s.scores_t);
    softmax_step_to_pairs<RV>(
        s.scores_t, num_keys, b.position_term_reversed ? b.position_term_reversed - j0 : nullptr,
        b.key_term ? b.key_term + j0 : nullptr, s.running_max, s.running_sum, s.rescale, s.p_pairs);
    const uint32_t* v_tile = b.v_pairs + j0 / 2 * b.d_padded;
    for (int r0 = 0; r0 < b.num_rows; r0 += 4)  // 4 x 4 accumulators fit the registers
      accumulate_value_pairs_all<4, 4>(s.p_pairs + r0, s.rescale + r0, v_tile, b.d_padded,
                                       (num_keys + 1) / 2, 0, s.acc + r0 * b.d_padded);
  }
  store_rows(b, s.acc, s.running_sum);
}

}  // namespace

int64_t attention_bf16_scratch_floats(int head_dim) {
  return PairScratch::floats(query_pair_rows(head_dim), kernels::round_up(head_dim, kLanes),
                             kKeyTile);
}

void attention_block_bf16(const AttentionBlockBf16& b, float* scratch) {
  if (b.num_rows <= kLanes)
    attention_rows_bf16<1>(b, scratch);
  else
    attention_rows_bf16<2>(b, scratch);
}

void pack_value_pairs(const uint16_t* v, int64_t v_row_stride, int64_t key_length, int head_dim,
                      int64_t d_padded, uint32_t* v_pairs) {
  for (int64_t c = 0; c < (key_length + 1) / 2; ++c) {
    const uint16_t* first = v + 2 * c * v_row_stride;
    const uint16_t* second = 2 * c + 1 < key_length ? first + v_row_stride : nullptr;
    uint32_t* out = v_pairs + c * d_padded;
    for (int d = 0; d < head_dim; ++d) out[d] = pair(first[d], second ? second[d] : 0);
    std::fill(out + head_dim, out + d_padded, 0u);
  }
}

}  // namespace umt5_fast
