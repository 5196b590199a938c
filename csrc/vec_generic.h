// Vec<generic>: one float per "vector", libm for the transcendental functions. The portable
// fallback, and the readable statement of what every wider Vec computes.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "bf16.h"
#include "fp16.h"
#include "vec.h"
#include "weight_types.h"

namespace umt5_fast {

template <>
struct Vec<CpuIsa::generic> {
  using type = float;
  static constexpr int width = 1;

  static type zero() { return 0.0f; }
  static type set1(float x) { return x; }
  static type load(const float* p) { return *p; }
  static void store(float* p, type x) { *p = x; }
  static type load_partial(const float* p, int n) { return n > 0 ? *p : 0.0f; }
  static void store_partial(float* p, type x, int n) {
    if (n > 0) *p = x;
  }
  static type add(type a, type b) { return a + b; }
  static type sub(type a, type b) { return a - b; }
  static type mul(type a, type b) { return a * b; }
  static type div(type a, type b) { return a / b; }
  static type fma(type a, type b, type c) { return a * b + c; }
  // x86's maxps / minps: b when either is NaN (std::max would return a), so that every ISA
  // propagates (or drops) a NaN alike.
  static type max(type a, type b) { return a > b ? a : b; }
  static type min(type a, type b) { return a < b ? a : b; }
  static float reduce_sum(type x) { return x; }
  static float reduce_max(type x) { return x; }
  static void reduce4(const type* x, float* sums) {
    for (int i = 0; i < 4; ++i) sums[i] = x[i];
  }
  static void transpose(type*) {}  // a 1 x 1 matrix
  static type exp(type x) { return std::exp(x); }
  static type tanh(type x) { return std::tanh(x); }
  static type erf(type x) { return std::erf(x); }
  static type load_weights(const int8_t* p) { return widen_weight(*p); }
  static type load_weights(const uint16_t* p) { return widen_weight(*p); }
  static type load_weights(const Fp16* p) { return widen_weight(*p); }
  static type load_weights(const float* p) { return *p; }
  static void store_rounded(uint16_t* p, type x) { *p = float_to_bf16(x); }
  static void store_rounded(Fp16* p, type x) { *p = float_to_fp16(x); }
};

}  // namespace umt5_fast
