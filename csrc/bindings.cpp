// One PYBIND11_MODULE; each kernel file registers its own functions.
#include <pybind11/pybind11.h>

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "umt5_fast C++ CPU kernels";
}
