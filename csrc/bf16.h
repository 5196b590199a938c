// bf16 bits <-> fp32, scalar (Vec<avx2> / Vec<avx512> convert whole vectors the same way).
// `static`: each translation unit keeps its own copy, compiled with its own ISA flags
// (weight_types.h).
#pragma once

#include <cstdint>
#include <cstring>

namespace umt5_fast {

static inline float bf16_to_float(uint16_t value) {
  const uint32_t bits = static_cast<uint32_t>(value) << 16;
  float out;
  std::memcpy(&out, &bits, sizeof(out));
  return out;
}

// Round to nearest, ties to even, as torch's .to(torch.bfloat16); NaN becomes torch's 0x7FC0.
static inline uint16_t float_to_bf16(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  if ((bits & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FC0;
  bits += 0x7FFFu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(bits >> 16);
}

}  // namespace umt5_fast
