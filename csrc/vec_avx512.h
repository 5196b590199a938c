// Vec<avx512>: sixteen floats in a __m512, AVX-512F only (no DQ/BW, so float bit operations go
// through the integer unit). Include only from kernels_avx512.cpp, the one translation unit
// compiled with -mavx512f. Same algorithms and constants as vec_avx2.h.
#pragma once

#include <immintrin.h>

#include <cstdint>

#include "fp16.h"
#include "vec.h"

namespace umt5_fast {

template <>
struct Vec<CpuIsa::avx512> {
  using type = __m512;
  static constexpr int width = 16;

  static type zero() { return _mm512_setzero_ps(); }
  static type set1(float x) { return _mm512_set1_ps(x); }
  static type load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, type x) { _mm512_storeu_ps(p, x); }
  static type load_partial(const float* p, int n) {
    return _mm512_maskz_loadu_ps(first_lanes(n), p);
  }
  static void store_partial(float* p, type x, int n) {
    _mm512_mask_storeu_ps(p, first_lanes(n), x);
  }
  static type add(type a, type b) { return _mm512_add_ps(a, b); }
  static type sub(type a, type b) { return _mm512_sub_ps(a, b); }
  static type mul(type a, type b) { return _mm512_mul_ps(a, b); }
  static type div(type a, type b) { return _mm512_div_ps(a, b); }
  static type fma(type a, type b, type c) { return _mm512_fmadd_ps(a, b, c); }
  static type max(type a, type b) { return _mm512_max_ps(a, b); }
  static type min(type a, type b) { return _mm512_min_ps(a, b); }

  static float reduce_sum(type x) { return _mm512_reduce_add_ps(x); }
  static float reduce_max(type x) { return _mm512_reduce_max_ps(x); }
  // Each vector folded to eight lanes, then three hadds and one add as in Vec<avx2>.
  static void reduce4(const type* x, float* sums) {
    const __m256 pairs = _mm256_hadd_ps(_mm256_hadd_ps(fold(x[0]), fold(x[1])),
                                        _mm256_hadd_ps(fold(x[2]), fold(x[3])));
    _mm_storeu_ps(sums, _mm_add_ps(_mm256_castps256_ps128(pairs),
                                   _mm256_extractf128_ps(pairs, 1)));
  }

  // Transposes the 16 x 16 matrix whose rows are r[0..15] in place (r[i] becomes column i):
  // pairs, then quadruples within 128-bit lanes, then the lanes themselves.
  static void transpose(type r[16]) {
    type t[16];
    for (int i = 0; i < 8; ++i) {
      t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
      t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 4; ++i) {
      r[4 * i] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], _MM_SHUFFLE(1, 0, 1, 0));
      r[4 * i + 1] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], _MM_SHUFFLE(3, 2, 3, 2));
      r[4 * i + 2] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], _MM_SHUFFLE(1, 0, 1, 0));
      r[4 * i + 3] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], _MM_SHUFFLE(3, 2, 3, 2));
    }
    for (int i = 0; i < 2; ++i)
      for (int j = 0; j < 4; ++j) {
        t[8 * i + j] = _mm512_shuffle_f32x4(r[8 * i + j], r[8 * i + j + 4], 0x88);
        t[8 * i + j + 4] = _mm512_shuffle_f32x4(r[8 * i + j], r[8 * i + j + 4], 0xdd);
      }
    for (int j = 0; j < 8; ++j) {
      r[j] = _mm512_shuffle_f32x4(t[j], t[j + 8], 0x88);
      r[j + 8] = _mm512_shuffle_f32x4(t[j], t[j + 8], 0xdd);
    }
  }

  // Cephes expf (see Vec<avx2>::exp).
  static type exp(type x) {
    // x second: max/min return their second operand when one is NaN, so NaN stays NaN.
    const type clamped = _mm512_min_ps(set1(88.3762626f), _mm512_max_ps(set1(-87.0f), x));
    const type n = _mm512_roundscale_ps(_mm512_mul_ps(clamped, set1(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    type r = _mm512_fnmadd_ps(n, set1(0.693359375f), clamped);
    r = _mm512_fnmadd_ps(n, set1(-2.12194440e-4f), r);
    type p = set1(1.9875691500e-4f);
    p = fma(p, r, set1(1.3981999507e-3f));
    p = fma(p, r, set1(8.3334519073e-3f));
    p = fma(p, r, set1(4.1665795894e-2f));
    p = fma(p, r, set1(1.6666665459e-1f));
    p = fma(p, r, set1(5.0000001201e-1f));
    p = add(fma(p, mul(r, r), r), set1(1.0f));
    const __m512i biased = _mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127));
    type y = mul(p, _mm512_castsi512_ps(_mm512_slli_epi32(biased, 23)));
    y = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, set1(-87.0f), _CMP_LT_OQ), y, zero());
    return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, set1(88.7228394f), _CMP_GT_OQ), y,
                                set1(__builtin_inff()));
  }

  // Cephes tanhf (see Vec<avx2>::tanh).
  static type tanh(type x) {
    const __m512i sign = sign_bits(x);
    const type abs_x = without_sign(x);
    const type z = mul(x, x);
    type p = set1(-5.70498872745e-3f);
    p = fma(p, z, set1(2.06390887954e-2f));
    p = fma(p, z, set1(-5.37397155531e-2f));
    p = fma(p, z, set1(1.33314422036e-1f));
    p = fma(p, z, set1(-3.33332819422e-1f));
    const type small = fma(mul(p, z), x, x);
    const type e = exp(add(abs_x, abs_x));
    const type large = with_sign(sub(set1(1.0f), div(set1(2.0f), add(e, set1(1.0f)))), sign);
    return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(abs_x, set1(0.625f), _CMP_LT_OQ), large,
                                small);
  }

  // erf to about 2 ulp (see Vec<avx2>::erf for the fits).
  static type erf(type x) {
    const __m512i sign = sign_bits(x);
    const type abs_x = without_sign(x);
    const type s = mul(x, x);
    type small = set1(7.89820988e-05f);
    small = fma(small, s, set1(-0.000802435388f));
    small = fma(small, s, set1(0.00519005349f));
    small = fma(small, s, set1(-0.0268548094f));
    small = fma(small, s, set1(0.112836123f));
    small = fma(small, s, set1(-0.376126289f));
    small = fma(small, s, set1(1.12837923f));
    small = mul(small, x);
    const type tau =
        div(set1(1.0f), fma(set1(0.5f), _mm512_min_ps(abs_x, set1(4.0f)), set1(1.0f)));
    type erfcx = set1(0.119280629f);
    erfcx = fma(erfcx, tau, set1(-0.471049935f));
    erfcx = fma(erfcx, tau, set1(0.563167095f));
    erfcx = fma(erfcx, tau, set1(-0.103617974f));
    erfcx = fma(erfcx, tau, set1(0.347843736f));
    erfcx = fma(erfcx, tau, set1(0.259666681f));
    erfcx = fma(erfcx, tau, set1(0.284917027f));
    erfcx = fma(erfcx, tau, set1(-0.000154544046f));
    const type large =
        with_sign(_mm512_fnmadd_ps(exp(sub(zero(), s)), erfcx, set1(1.0f)), sign);
    return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(abs_x, set1(1.0f), _CMP_LT_OQ), large, small);
  }

  static type load_weights(const int8_t* p) {
    const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(bytes));
  }
  static type load_weights(const uint16_t* p) {  // bf16: the high half of a float32
    const __m256i halves = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(halves), 16));
  }
  static type load_weights(const Fp16* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  static type load_weights(const float* p) { return _mm512_loadu_ps(p); }

  // x rounded to bf16 (nearest even; NaN -> 0x7FC0: bf16.h's float_to_bf16) at p.
  static void store_rounded(uint16_t* p, type x) {
    const __m512i bits = _mm512_castps_si512(x);
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    __m512i rounded = _mm512_srli_epi32(
        _mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF))), 16);
    rounded = _mm512_mask_mov_epi32(rounded, _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q),
                                    _mm512_set1_epi32(0x7FC0));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(rounded));
  }

  // x rounded to fp16 (nearest even, as fp16.h's float_to_fp16) at p.
  static void store_rounded(Fp16* p, type x) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT));
  }

 private:
  static __mmask16 first_lanes(int n) {
    return n >= 16 ? __mmask16(0xFFFF) : n <= 0 ? __mmask16(0) : __mmask16((1u << n) - 1);
  }
  static __m256 fold(type x) {  // the sum of the two 256-bit halves
    return _mm256_add_ps(_mm512_castps512_ps256(x),
                         _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(x), 1)));
  }
  static __m512i sign_bits(type x) {
    return _mm512_and_si512(_mm512_castps_si512(x), _mm512_set1_epi32(INT32_MIN));
  }
  static type without_sign(type x) {
    return _mm512_castsi512_ps(
        _mm512_and_si512(_mm512_castps_si512(x), _mm512_set1_epi32(INT32_MAX)));
  }
  static type with_sign(type magnitude, __m512i sign) {
    return _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(magnitude), sign));
  }
};

}  // namespace umt5_fast
