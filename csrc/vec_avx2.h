// Vec<avx2>: eight floats in a __m256, AVX2 + FMA. Include only from kernels_avx2.cpp, the one
// translation unit compiled with -mavx2 -mfma -mf16c.
#pragma once

#include <immintrin.h>

#include <cstdint>

#include "fp16.h"
#include "vec.h"

namespace umt5_fast {

template <>
struct Vec<CpuIsa::avx2> {
  using type = __m256;
  static constexpr int width = 8;

  static type zero() { return _mm256_setzero_ps(); }
  static type set1(float x) { return _mm256_set1_ps(x); }
  static type load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, type x) { _mm256_storeu_ps(p, x); }
  static type load_partial(const float* p, int n) { return _mm256_maskload_ps(p, first_lanes(n)); }
  static void store_partial(float* p, type x, int n) {
    _mm256_maskstore_ps(p, first_lanes(n), x);
  }
  static type add(type a, type b) { return _mm256_add_ps(a, b); }
  static type sub(type a, type b) { return _mm256_sub_ps(a, b); }
  static type mul(type a, type b) { return _mm256_mul_ps(a, b); }
  static type div(type a, type b) { return _mm256_div_ps(a, b); }
  static type fma(type a, type b, type c) { return _mm256_fmadd_ps(a, b, c); }
  static type max(type a, type b) { return _mm256_max_ps(a, b); }
  static type min(type a, type b) { return _mm256_min_ps(a, b); }

  static float reduce_sum(type x) {
    __m128 v = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
    v = _mm_add_ps(v, _mm_movehl_ps(v, v));
    return _mm_cvtss_f32(_mm_add_ss(v, _mm_movehdup_ps(v)));
  }
  static float reduce_max(type x) {
    __m128 v = _mm_max_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
    v = _mm_max_ps(v, _mm_movehl_ps(v, v));
    return _mm_cvtss_f32(_mm_max_ss(v, _mm_movehdup_ps(v)));
  }
  // Horizontal sums of four vectors at once: three hadds and one add instead of four reductions.
  static void reduce4(const type* x, float* sums) {
    const __m256 pairs = _mm256_hadd_ps(_mm256_hadd_ps(x[0], x[1]), _mm256_hadd_ps(x[2], x[3]));
    _mm_storeu_ps(sums, _mm_add_ps(_mm256_castps256_ps128(pairs),
                                   _mm256_extractf128_ps(pairs, 1)));
  }

  // Transposes the 8 x 8 matrix whose rows are r[0..7] in place (r[i] becomes column i): pairs,
  // then quadruples within 128-bit lanes, then the lanes themselves.
  static void transpose(type r[8]) {
    type t[8];
    for (int i = 0; i < 4; ++i) {
      t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
      t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 2; ++i) {
      r[4 * i] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], _MM_SHUFFLE(1, 0, 1, 0));
      r[4 * i + 1] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], _MM_SHUFFLE(3, 2, 3, 2));
      r[4 * i + 2] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], _MM_SHUFFLE(1, 0, 1, 0));
      r[4 * i + 3] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], _MM_SHUFFLE(3, 2, 3, 2));
    }
    for (int j = 0; j < 4; ++j) {
      t[j] = _mm256_permute2f128_ps(r[j], r[j + 4], 0x20);
      t[j + 4] = _mm256_permute2f128_ps(r[j], r[j + 4], 0x31);
    }
    for (int j = 0; j < 8; ++j) r[j] = t[j];
  }

  // Cephes expf: exp(x) = 2^n * exp(r), |r| <= ln2 / 2, degree-5 polynomial (about 1 ulp).
  // Overflows to +inf above 88.72; returns 0 below -87 (e^-87 = 1.6e-38): nearer the subnormal
  // range (from e^-87.34) the product by 2^n would round to subnormals, which x86 cores compute
  // through microcode assists (a clamp at -87.34 made every masked or far-below-max score one).
  static type exp(type x) {
    // x second: max/min return their second operand when one is NaN, so NaN stays NaN.
    const type clamped = _mm256_min_ps(set1(88.3762626f), _mm256_max_ps(set1(-87.0f), x));
    const type n = _mm256_round_ps(_mm256_mul_ps(clamped, set1(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    type r = _mm256_fnmadd_ps(n, set1(0.693359375f), clamped);
    r = _mm256_fnmadd_ps(n, set1(-2.12194440e-4f), r);
    type p = set1(1.9875691500e-4f);
    p = fma(p, r, set1(1.3981999507e-3f));
    p = fma(p, r, set1(8.3334519073e-3f));
    p = fma(p, r, set1(4.1665795894e-2f));
    p = fma(p, r, set1(1.6666665459e-1f));
    p = fma(p, r, set1(5.0000001201e-1f));
    p = add(fma(p, mul(r, r), r), set1(1.0f));
    const __m256i biased = _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127));
    type y = mul(p, _mm256_castsi256_ps(_mm256_slli_epi32(biased, 23)));
    y = _mm256_blendv_ps(y, zero(), _mm256_cmp_ps(x, set1(-87.0f), _CMP_LT_OQ));
    return _mm256_blendv_ps(y, set1(__builtin_inff()),
                            _mm256_cmp_ps(x, set1(88.7228394f), _CMP_GT_OQ));
  }

  // Cephes tanhf: odd polynomial below |x| = 0.625, 1 - 2 / (exp(2|x|) + 1) above (relative
  // error about 2e-7 over the whole range).
  static type tanh(type x) {
    const type sign = _mm256_and_ps(x, set1(-0.0f));
    const type abs_x = _mm256_andnot_ps(set1(-0.0f), x);
    const type z = mul(x, x);
    type p = set1(-5.70498872745e-3f);
    p = fma(p, z, set1(2.06390887954e-2f));
    p = fma(p, z, set1(-5.37397155531e-2f));
    p = fma(p, z, set1(1.33314422036e-1f));
    p = fma(p, z, set1(-3.33332819422e-1f));
    const type small = fma(mul(p, z), x, x);
    const type e = exp(add(abs_x, abs_x));
    const type large = _mm256_or_ps(
        sub(set1(1.0f), div(set1(2.0f), add(e, set1(1.0f)))), sign);
    return _mm256_blendv_ps(large, small, _mm256_cmp_ps(abs_x, set1(0.625f), _CMP_LT_OQ));
  }

  // erf to about 2 ulp (least-squares fits in double, checked against libm):
  //   |x| < 1:  x * P(x^2), degree 6;
  //   |x| >= 1: 1 - exp(-x^2) * erfcx(|x|), erfcx as a degree-7 polynomial in 1 / (1 + |x| / 2)
  //             fitted on [1, 4] (erf rounds to 1 beyond 3.92, so |x| is clamped to 4 there).
  static type erf(type x) {
    const type sign = _mm256_and_ps(x, set1(-0.0f));
    const type abs_x = _mm256_andnot_ps(set1(-0.0f), x);
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
        div(set1(1.0f), fma(set1(0.5f), _mm256_min_ps(abs_x, set1(4.0f)), set1(1.0f)));
    type erfcx = set1(0.119280629f);
    erfcx = fma(erfcx, tau, set1(-0.471049935f));
    erfcx = fma(erfcx, tau, set1(0.563167095f));
    erfcx = fma(erfcx, tau, set1(-0.103617974f));
    erfcx = fma(erfcx, tau, set1(0.347843736f));
    erfcx = fma(erfcx, tau, set1(0.259666681f));
    erfcx = fma(erfcx, tau, set1(0.284917027f));
    erfcx = fma(erfcx, tau, set1(-0.000154544046f));
    const type large = _mm256_or_ps(
        _mm256_fnmadd_ps(exp(_mm256_xor_ps(s, set1(-0.0f))), erfcx, set1(1.0f)), sign);
    return _mm256_blendv_ps(large, small, _mm256_cmp_ps(abs_x, set1(1.0f), _CMP_LT_OQ));
  }

  static type load_weights(const int8_t* p) {
    const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes));
  }
  static type load_weights(const uint16_t* p) {  // bf16: the high half of a float32
    const __m128i halves = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(halves), 16));
  }
  static type load_weights(const Fp16* p) {  // F16C
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  static type load_weights(const float* p) { return _mm256_loadu_ps(p); }

  // x rounded to bf16 (nearest even; NaN -> 0x7FC0: bf16.h's float_to_bf16) at p.
  static void store_rounded(uint16_t* p, type x) {
    const __m256i bits = _mm256_castps_si256(x);
    const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
    __m256i rounded = _mm256_srli_epi32(
        _mm256_add_epi32(bits, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7FFF))), 16);
    rounded = _mm256_blendv_epi8(rounded, _mm256_set1_epi32(0x7FC0),
                                 _mm256_castps_si256(_mm256_cmp_ps(x, x, _CMP_UNORD_Q)));
    // packus works within 128-bit lanes: the permute brings the two lanes' halves together.
    const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(rounded, rounded), 0xD8);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
  }

  // x rounded to fp16 (nearest even, as fp16.h's float_to_fp16) at p.
  static void store_rounded(Fp16* p, type x) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT));
  }

 private:
  static __m256i first_lanes(int n) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  }
};

}  // namespace umt5_fast
