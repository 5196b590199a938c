// Scalar widening of the stored weight types to float (int8 values, bf16 bit patterns, fp16, fp32;
// also attention's half-precision values).
// `static`: each translation unit keeps its own copy, compiled with its own ISA flags.
#pragma once

#include <cstdint>

#include "bf16.h"
#include "fp16.h"

namespace umt5_fast {

static inline float widen_weight(int8_t w) { return static_cast<float>(w); }

static inline float widen_weight(float w) { return w; }

static inline float widen_weight(uint16_t bf16_bits) { return bf16_to_float(bf16_bits); }

static inline float widen_weight(Fp16 w) { return fp16_to_float(w); }

}  // namespace umt5_fast
