// Vec<ISA>: the SIMD vocabulary kernels_impl.h is written in. Each specialisation lives in its
// own header, included only by the translation unit compiled for that ISA (kernels_<isa>.cpp).
//
// Members (all static): `type`, `width`, zero, set1, load, store, load_partial/store_partial
// (first n lanes; unused lanes read as 0), add, sub, mul, div, fma (a * b + c), max, min,
// reduce_sum, reduce_max, reduce4 (four vectors -> their four sums), exp, tanh, erf,
// load_weights (width int8, bf16 or fp16 values widened to float), store_rounded (width
// floats rounded to bf16 bits or fp16, nearest even).
#pragma once

#include "cpu_isa.h"

namespace umt5_fast {

template <CpuIsa ISA>
struct Vec;

}  // namespace umt5_fast
