// bf16 pair packing shared by the two bf16 attention kernels (attention_bf16.cpp: AVX512-BF16
// vdpbf16ps; attention_amx.cpp: AMX tiles). Both multiply pairs of bf16 numbers held in one
// 32-bit lane, so q is packed as pairs of consecutive dims and the probabilities as pairs of
// consecutive keys, rows (queries) across lanes: [pairs][kRowStride]. Include only from
// translation units built with kernels_avx512.cpp's flags.
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <limits>

#include "attention_bf16.h"
#include "bf16.h"
#include "kernels_impl.h"

#define UMT5_FAST_BF16_TARGET __attribute__((target("avx512bw,avx512vl,avx512bf16")))

namespace umt5_fast {
namespace bf16_pairs {

using kernels::kRowStride;  // transposed tiles: floats (or pairs) per key, one per row
constexpr int kLanes = 16;

inline uint32_t pair(uint16_t low, uint16_t high) { return low | static_cast<uint32_t>(high) << 16; }

// q_pairs[i][r] = dims (2i, 2i + 1) of row r, times scale (rounded to bf16 when scale != 1), for
// i < pair_rows; rows past num_rows, an odd head_dim's missing dim and pairs past the head are 0.
inline void pack_query_pairs(const AttentionBlockBf16& b, int pair_rows, uint32_t* q_pairs) {
  const auto scaled = [&](uint16_t x) {
    return b.scale == 1.0f ? x : float_to_bf16(bf16_to_float(x) * b.scale);
  };
  for (int i = 0; i < pair_rows; ++i)
    for (int r = 0; r < kRowStride; ++r) {
      uint32_t value = 0;
      if (r < b.num_rows && 2 * i < b.head_dim) {
        const uint16_t* row = b.q + r * b.q_row_stride;
        value = pair(scaled(row[2 * i]), 2 * i + 1 < b.head_dim ? scaled(row[2 * i + 1]) : 0);
      }
      q_pairs[i * kRowStride + r] = value;
    }
}

// One block's per-thread scratch, every part [rows of][kRowStride]: q pairs, the accumulator
// (acc_rows rows: [kRowStride][d_padded] for the vdpbf16ps kernel, [d_padded][kRowStride] for
// AMX), a key tile's scores and its probability pairs, then the running max, sum and rescale.
struct PairScratch {
  uint32_t* q_pairs;
  float* acc;
  float* scores_t;
  uint32_t* p_pairs;
  float *running_max, *running_sum, *rescale;
  int64_t acc_floats;

  static int64_t floats(int64_t q_pair_rows, int64_t acc_rows, int key_tile) {
    return (q_pair_rows + acc_rows + key_tile + key_tile / 2 + 3) * kRowStride;
  }

  // Lays the parts out from base, and starts the block: accumulator 0, running max -inf, sum 0.
  PairScratch(float* base, int64_t q_pair_rows, int64_t acc_rows, int key_tile)
      : acc_floats(acc_rows * kRowStride) {
    static_assert(sizeof(uint32_t) == sizeof(float), "pairs share the float scratch");
    q_pairs = reinterpret_cast<uint32_t*>(base);
    acc = base + q_pair_rows * kRowStride;
    scores_t = acc + acc_floats;
    p_pairs = reinterpret_cast<uint32_t*>(scores_t + key_tile * kRowStride);
    running_max = reinterpret_cast<float*>(p_pairs + key_tile / 2 * kRowStride);
    running_sum = running_max + kRowStride;
    rescale = running_sum + kRowStride;
    std::fill(acc, acc + acc_floats, 0.0f);
    std::fill(running_max, running_max + kRowStride, -std::numeric_limits<float>::infinity());
    std::fill(running_sum, running_sum + kRowStride, 0.0f);
  }
};

// exp(score - max) (<= 0, or NaN) to 2.7e-6 relative error, for probabilities that are rounded to
// bf16 (2^-9): 2^u = 2^n 2^f with u = (score - max) log2(e), n = round(u), f in [-1/2, 1/2] by a
// degree-4 polynomial (fitted for relative error), times 2^n by vscalefps. 10 operations where
// Cephes expf takes 22 (its fp32 accuracy costs a two-part ln 2 reduction, a degree-6 polynomial
// and range fix-ups): the softmax and its packing were a third of the bf16 kernel's time. u < -126
// gives 0 (masked keys' -1e30 included) rather than a subnormal, which x86 cores produce slowly;
// the bf16 conversion takes subnormals as 0 anyway. NaN stays NaN.
UMT5_FAST_BF16_TARGET inline __m512 exp_of_shifted_for_bf16(__m512 score, __m512 max) {
  const __m512 u = _mm512_mul_ps(_mm512_sub_ps(score, max), _mm512_set1_ps(1.44269504088896341f));
  const __mmask16 normal = _mm512_cmp_ps_mask(u, _mm512_set1_ps(-126.0f), _CMP_NLT_UQ);
  const __m512 n = _mm512_roundscale_ps(u, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(u, n);
  __m512 p = _mm512_set1_ps(9.570099413394928e-3f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.591785907745361e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.40247443318367e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.931217908859253e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.999992847442627e-1f));
  return _mm512_maskz_scalef_ps(normal, p, n);
}

struct ExpOfShiftedForBf16 {
  UMT5_FAST_BF16_TARGET __m512 operator()(__m512 score, __m512 max) const {
    return exp_of_shifted_for_bf16(score, max);
  }
};

// Stores the probabilities of keys (c, c + 1) for row vector v as bf16 pairs: both vectors
// rounded by one vcvtne2ps2bf16 (key c's in the low 16 halves), then interleaved by row.
struct StoreKeyPairs {
  uint32_t* p_pairs;

  UMT5_FAST_BF16_TARGET void operator()(int c, int v, __m512 low, __m512 high, bool) const {
    alignas(64) static constexpr uint16_t kInterleaveRows[32] = {
        0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23,
        8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
    const __m512i both = (__m512i)_mm512_cvtne2ps_pbh(high, low);
    _mm512_storeu_si512(p_pairs + c / 2 * kRowStride + v * kLanes,
                        _mm512_permutexvar_epi16(_mm512_load_si512(kInterleaveRows), both));
  }
};

// kernels::softmax_step_transposed whose probabilities (exp_of_shifted_for_bf16) go to
// p_pairs[c][r] = keys (2c, 2c + 1) of row r as bf16 (an odd tile's last key pairs with 0),
// without an fp32 pass between. Flattened: the functors' bf16 code can only be inlined into a
// function compiled for bf16, which softmax_step_transposed is not until it is inlined here.
template <int RV>
UMT5_FAST_BF16_TARGET __attribute__((flatten)) void softmax_step_to_pairs(
    float* scores_t, int num_keys, const float* position_term_reversed, const float* key_term,
    float* running_max, float* running_sum, float* rescale, uint32_t* p_pairs) {
  kernels::softmax_step_transposed<CpuIsa::avx512, RV>(
      scores_t, num_keys, position_term_reversed, key_term, running_max, running_sum, rescale,
      StoreKeyPairs{p_pairs}, ExpOfShiftedForBf16{});
}

}  // namespace bf16_pairs
}  // namespace umt5_fast
