// Whole arrays of bf16 bits / fp16 widened to fp32 or fp32 rounded to them, with the selected ISA's
// vector conversions (ops.h).
#include "ops.h"

namespace umt5_fast {

template <typename From, typename To>
void run_convert(const From* in, To* out, int64_t n) {
  void (*convert)(const From*, To*, int64_t) = nullptr;
  UMT5_DISPATCH_ISA(ISA, convert = &kernels::convert_values<ISA, From, To>);
  convert(in, out, n);
}

template void run_convert(const uint16_t*, float*, int64_t);
template void run_convert(const float*, uint16_t*, int64_t);
template void run_convert(const Fp16*, float*, int64_t);
template void run_convert(const float*, Fp16*, int64_t);

}  // namespace umt5_fast
