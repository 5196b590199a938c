// The x86 flush-to-zero mode (MXCSR.FTZ) for the OpenMP threads the extension shares with torch:
// results below fp32's normal range become 0 instead of subnormals, which x86 cores produce through
// a microcode assist ~100x slower than a normal result. ops.cpu turns it on around torch ops whose
// subnormal results cannot change what they return (log_softmax's sum of exp(x - max) >= 1).
#include <pybind11/pybind11.h>

#if defined(__x86_64__) || defined(_M_X64)
#include <xmmintrin.h>
#define UMT5_HAS_MXCSR 1
#endif

namespace py = pybind11;

namespace umt5_fast {

namespace {

#if UMT5_HAS_MXCSR
constexpr unsigned kFlushToZero = 1u << 15;
#endif

// Sets the mode in the calling thread and in each of a `num_threads` OpenMP team (the pool torch's
// parallel ops run on); returns the calling thread's previous mode.
bool set_flush_to_zero(bool on, int num_threads) {
#if UMT5_HAS_MXCSR
  const bool previous = (_mm_getcsr() & kFlushToZero) != 0;
#pragma omp parallel num_threads(num_threads)
  {
    const unsigned csr = _mm_getcsr();
    _mm_setcsr(on ? (csr | kFlushToZero) : (csr & ~kFlushToZero));
  }
  return previous;
#else
  (void)on;
  (void)num_threads;
  return false;
#endif
}

}  // namespace

void register_float_env(py::module_& m) {
  m.def("set_flush_to_zero", &set_flush_to_zero, py::arg("on"), py::arg("num_threads"),
        "Flush-to-zero on / off in the calling thread and an OpenMP team of num_threads; returns the "
        "calling thread's previous setting (False where the CPU has no such mode).");
}

}  // namespace umt5_fast
