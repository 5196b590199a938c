// Test hook exposing bucket.h, so Python can hold it equal to umt5_fast.buckets.
#include "bucket.h"

#include <vector>

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

namespace py = pybind11;

namespace umt5_fast {

void register_bucket(py::module_& m) {
  m.def("relative_position_bucket_table",
        [](int64_t first, int64_t last, bool bidirectional, int num_buckets, int max_distance,
           uintptr_t distance_buckets) {
          std::vector<int> buckets;
          for (int64_t position = first; position <= last; ++position)
            buckets.push_back(relative_position_bucket(position, bidirectional, num_buckets, max_distance,
                                                       reinterpret_cast<const int32_t*>(distance_buckets)));
          return buckets;
        },
        py::arg("first"), py::arg("last"), py::arg("bidirectional"), py::arg("num_buckets"),
        py::arg("max_distance"), py::arg("distance_buckets"),
        "Buckets of the relative positions first..last (inclusive), from csrc/bucket.h.");
}

}  // namespace umt5_fast
