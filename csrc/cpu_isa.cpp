#include "cpu_isa.h"

#include <atomic>
#include <stdexcept>
#include <string>
#include <vector>

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

namespace py = pybind11;

namespace umt5_fast {
namespace {

constexpr CpuIsa kAllIsas[] = {CpuIsa::generic, CpuIsa::avx2, CpuIsa::avx512};  // portable first

CpuIsa best_supported_isa() {
  CpuIsa best = CpuIsa::generic;
  for (CpuIsa isa : kAllIsas)
    if (cpu_supports(isa)) best = isa;
  return best;
}

std::atomic<CpuIsa>& selected_isa() {
  static std::atomic<CpuIsa> isa{best_supported_isa()};
  return isa;
}

const char* isa_name(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::avx512: return "avx512";
    case CpuIsa::avx2: return "avx2";
    case CpuIsa::generic: return "generic";
  }
  return "unknown";
}

CpuIsa isa_from_name(const std::string& name) {
  for (CpuIsa isa : kAllIsas)
    if (name == isa_name(isa)) return isa;
  throw std::invalid_argument("isa must be 'generic', 'avx2' or 'avx512', got '" + name + "'");
}

}  // namespace

bool cpu_supports(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::avx512:  // kernels_avx512.cpp is built with -mavx512f -mavx2 -mfma -mf16c
      return __builtin_cpu_supports("avx512f") && cpu_supports(CpuIsa::avx2);
    case CpuIsa::avx2:  // kernels_avx2.cpp is built with -mavx2 -mfma -mf16c
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
             __builtin_cpu_supports("f16c");
    case CpuIsa::generic:
      return true;
  }
  return false;
}

CpuIsa cpu_isa() { return selected_isa().load(std::memory_order_relaxed); }

void set_cpu_isa(CpuIsa isa) {
  if (!cpu_supports(isa))
    throw std::invalid_argument(std::string("this CPU does not support ") + isa_name(isa));
  selected_isa().store(isa, std::memory_order_relaxed);
}

void register_cpu_isa(py::module_& m) {
  m.def("cpu_isa", [] { return std::string(isa_name(cpu_isa())); },
        "Instruction set the kernels currently run with.");
  m.def("supported_cpu_isas", [] {
    std::vector<std::string> names;
    for (CpuIsa isa : kAllIsas)
      if (cpu_supports(isa)) names.push_back(isa_name(isa));
    return names;
  }, "Instruction sets this CPU can run, portable first.");
  // Which BLAS engine is faster depends on the vendor too: MKL runs AVX-512 code on Intel CPUs only.
  m.def("cpu_vendor", [] {
    __builtin_cpu_init();
    return std::string(__builtin_cpu_is("intel") ? "intel" : __builtin_cpu_is("amd") ? "amd" : "other");
  }, "'intel', 'amd' or 'other'.");
  // std::invalid_argument reaches Python as ValueError.
  m.def("set_cpu_isa", [](const std::string& name) { set_cpu_isa(isa_from_name(name)); },
        py::arg("isa"), "Force an instruction set (a test hook: kernels are checked on each one).");
}

}  // namespace umt5_fast
