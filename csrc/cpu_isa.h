// Run-time choice of the instruction set the kernels use: the one dispatch place.
//
// kernels_<isa>.cpp compile the same templated kernels (kernels_impl.h) once per ISA, each with
// its own compiler flags; op files call them through UMT5_DISPATCH_ISA, which picks the
// instantiation for cpu_isa(). Adding an ISA means: a Vec specialisation, a kernels_<isa>.cpp,
// a case below and in cpu_isa.cpp.
#pragma once

namespace umt5_fast {

enum class CpuIsa { generic, avx2, avx512 };

// The ISA kernels run with: the best one cpu_supports(), unless set_cpu_isa chose another.
CpuIsa cpu_isa();

// Forces an ISA (tests run every kernel on each one). Throws std::invalid_argument when the CPU
// lacks it or UMT5_FAST_CPU_ISA caps it.
void set_cpu_isa(CpuIsa isa);

// Whether this CPU has the ISA and UMT5_FAST_CPU_ISA (if set) allows it.
bool cpu_supports(CpuIsa isa);

// Whether UMT5_FAST_CPU_ISA allows AMX tiles (unset or "amx").
bool amx_allowed();

}  // namespace umt5_fast

// Runs the statements with `constexpr CpuIsa ISA` bound to the selected instruction set.
#define UMT5_DISPATCH_ISA(ISA, ...)                                      \
  switch (::umt5_fast::cpu_isa()) {                                      \
    case ::umt5_fast::CpuIsa::avx512: {                                  \
      constexpr ::umt5_fast::CpuIsa ISA = ::umt5_fast::CpuIsa::avx512;   \
      __VA_ARGS__;                                                       \
      break;                                                             \
    }                                                                    \
    case ::umt5_fast::CpuIsa::avx2: {                                    \
      constexpr ::umt5_fast::CpuIsa ISA = ::umt5_fast::CpuIsa::avx2;     \
      __VA_ARGS__;                                                       \
      break;                                                             \
    }                                                                    \
    case ::umt5_fast::CpuIsa::generic: {                                 \
      constexpr ::umt5_fast::CpuIsa ISA = ::umt5_fast::CpuIsa::generic;  \
      __VA_ARGS__;                                                       \
      break;                                                             \
    }                                                                    \
  }
