// The kernels for AVX2 + FMA CPUs: Vec<avx2>. CMakeLists.txt compiles this file alone with
// -mavx2 -mfma -mf16c; cpu_isa() only selects it on CPUs that have them.
#include "vec_avx2.h"
#include "kernels_impl.h"

UMT5_INSTANTIATE_KERNELS(CpuIsa::avx2)
