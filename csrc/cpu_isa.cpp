#include "cpu_isa.h"

#include <atomic>
#include <cstdlib>
#include <stdexcept>
#include <string>
#include <vector>

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

namespace py = pybind11;

namespace umt5_fast {
namespace {

constexpr CpuIsa kAllIsas[] = {CpuIsa::generic, CpuIsa::avx2, CpuIsa::avx512};  // portable first
constexpr const char* kCapEnv = "UMT5_FAST_CPU_ISA";

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

// The cap UMT5_FAST_CPU_ISA puts on what the kernels may use, read once: "generic", "avx2",
// "avx512" (without AMX tiles) or "amx" (everything; the default). One machine can so run what a
// CPU with fewer instruction sets runs (the benchmarks set torch's, MKL's and oneDNN's caps to
// match). umt5_fast/__init__.py checks the name first, with the same message, so that a typo is a
// ValueError at import rather than an extension that fails to load and is left out.
struct IsaCap {
  CpuIsa isa;
  bool amx;
};

IsaCap read_isa_cap() {
  const char* value = std::getenv(kCapEnv);
  const std::string name = value ? value : "";
  if (name.empty() || name == "amx") return {CpuIsa::avx512, true};
  for (CpuIsa isa : kAllIsas)
    if (name == isa_name(isa)) return {isa, false};
  throw std::invalid_argument(std::string(kCapEnv) +
                              " must be 'generic', 'avx2', 'avx512' or 'amx', got '" + name + "'");
}

const IsaCap& isa_cap() {
  static const IsaCap cap = read_isa_cap();
  return cap;
}

}  // namespace

bool amx_allowed() { return isa_cap().amx; }

bool cpu_supports(CpuIsa isa) {
  if (isa > isa_cap().isa) return false;
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
    throw std::invalid_argument(std::string(isa_name(isa)) + " is not available: this CPU lacks it" +
                                (isa_cap().isa < isa ? std::string(" or ") + kCapEnv + " caps it" : ""));
  selected_isa().store(isa, std::memory_order_relaxed);
}

void register_cpu_isa(py::module_& m) {
  isa_cap();  // a bad UMT5_FAST_CPU_ISA fails the import, not a later kernel call
  m.def("cpu_isa", [] { return std::string(isa_name(cpu_isa())); },
        "Instruction set the kernels currently run with.");
  m.def("supported_cpu_isas", [] {
    std::vector<std::string> names;
    for (CpuIsa isa : kAllIsas)
      if (cpu_supports(isa)) names.push_back(isa_name(isa));
    return names;
  }, "Instruction sets this CPU can run (up to UMT5_FAST_CPU_ISA), portable first.");
  // Which BLAS engine is faster depends on the vendor too: MKL runs AVX-512 code on Intel CPUs only.
  m.def("cpu_vendor", [] {
    __builtin_cpu_init();
    return std::string(__builtin_cpu_is("intel") ? "intel" : __builtin_cpu_is("amd") ? "amd" : "other");
  }, "'intel', 'amd' or 'other'.");
  // Whether torch's bf16 GEMM (oneDNN) has bf16 dot products to run on: without them oneDNN
  // emulates bf16 on AVX-512 at a third to a quarter of the fp32 GEMM's rate (Ice Lake Xeon).
  m.def("cpu_has_avx512_bf16", [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512bf16") != 0;
  }, "Whether this CPU has AVX512-BF16 (whatever UMT5_FAST_CPU_ISA says; AMX-BF16 CPUs have it).");
  // Likewise fp16 (oneDNN's own check is not relied on alone, as for bf16).
  m.def("cpu_has_avx512_fp16", [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512fp16") != 0;
  }, "Whether this CPU has AVX512-FP16 (whatever UMT5_FAST_CPU_ISA says; AMX-FP16 CPUs have it).");
  // std::invalid_argument reaches Python as ValueError.
  m.def("set_cpu_isa", [](const std::string& name) { set_cpu_isa(isa_from_name(name)); },
        py::arg("isa"), "Force an instruction set (a test hook: kernels are checked on each one).");
}

}  // namespace umt5_fast
