// The kernels for AVX-512F CPUs: Vec<avx512>. CMakeLists.txt compiles this file alone with
// -mavx512f -mavx2 -mfma -mf16c; cpu_isa() only selects it on CPUs (and OSes) that have them.
#include "vec_avx512.h"
#include "kernels_impl.h"

UMT5_INSTANTIATE_KERNELS(CpuIsa::avx512)
