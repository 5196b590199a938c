// The kernels for any CPU: Vec<generic>, built with the project's default flags.
#include "vec_generic.h"
#include "kernels_impl.h"

UMT5_INSTANTIATE_KERNELS(CpuIsa::generic)
