// IEEE binary16 (torch.float16) values: a type of their own, since uint16_t already means bf16 bits
// in these kernels, and the scalar conversions the portable build and tails use. Vec<avx2> and
// Vec<avx512> convert whole vectors with F16C / AVX-512 (vcvtph2ps, vcvtps2ph), which round the
// same way (NaN payloads aside). `static`: each translation unit keeps its own copy, compiled with
// its own ISA flags (weight_types.h).
#pragma once

#include <cstdint>
#include <cstring>

namespace umt5_fast {

struct Fp16 {
  uint16_t bits;
};
static_assert(sizeof(Fp16) == 2, "Fp16 must be the 2 bytes of a torch.float16 element");

static inline float fp16_to_float(Fp16 value) {  // exact
  const uint32_t sign = static_cast<uint32_t>(value.bits & 0x8000u) << 16;
  const uint32_t exponent = (value.bits >> 10) & 0x1Fu;
  const uint32_t mantissa = value.bits & 0x3FFu;
  uint32_t bits;
  if (exponent == 0x1F) {  // inf / NaN (payload kept, quieted as vcvtph2ps does)
    bits = sign | 0x7F800000u | (mantissa << 13) | (mantissa ? 0x400000u : 0u);
  } else if (exponent == 0) {  // zero / subnormal: mantissa * 2^-24, exact in fp32
    const float magnitude = static_cast<float>(mantissa) * 5.9604644775390625e-8f;
    std::memcpy(&bits, &magnitude, sizeof(bits));
    bits |= sign;
  } else {  // rebias the exponent: 15 -> 127
    bits = sign | ((exponent + 112u) << 23) | (mantissa << 13);
  }
  float out;
  std::memcpy(&out, &bits, sizeof(out));
  return out;
}

// Round to nearest, ties to even, as torch's .to(torch.float16): past 65520 -> inf, below 2^-25 ->
// zero, subnormals in between; NaN -> a quiet NaN (0x7E00 with the sign).
static inline Fp16 float_to_fp16(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  const uint16_t sign = static_cast<uint16_t>((bits >> 16) & 0x8000u);
  const uint32_t magnitude = bits & 0x7FFFFFFFu;
  if (magnitude > 0x7F800000u) return Fp16{static_cast<uint16_t>(sign | 0x7E00u)};
  if (magnitude >= 0x477FF000u) return Fp16{static_cast<uint16_t>(sign | 0x7C00u)};  // >= 65520
  if (magnitude >= 0x38800000u) {  // a normal half (>= 2^-14): drop 13 mantissa bits, rebias
    const uint32_t rounded = magnitude + 0xFFFu + ((magnitude >> 13) & 1u);
    return Fp16{static_cast<uint16_t>(sign | ((rounded >> 13) - (112u << 10)))};
  }
  if (magnitude <= 0x33000000u) return Fp16{sign};  // <= 2^-25 (a tie there rounds to even 0)
  // Subnormal: the 24-bit significand m * 2^(e - 150) in units of 2^-24 is m >> (126 - e).
  const uint32_t significand = (magnitude & 0x7FFFFFu) | 0x800000u;
  const uint32_t shift = 126u - (magnitude >> 23);  // 14..24
  uint32_t units = significand >> shift;
  const uint32_t rest = significand & ((1u << shift) - 1u), half = 1u << (shift - 1u);
  if (rest > half || (rest == half && (units & 1u))) ++units;  // may carry into the smallest normal
  return Fp16{static_cast<uint16_t>(sign | units)};
}

}  // namespace umt5_fast
