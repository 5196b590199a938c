// OpenMP helper shared by the row-parallel ops. The thread count comes from Python
// (torch.get_num_threads()), so the kernels follow torch's setting.
#pragma once

#include <algorithm>
#include <cstdint>

namespace umt5_fast {

// Calls body(begin, end) on contiguous ranges covering [0, n), one per thread, using no more
// threads than leave each at least `grain` items (below that, waking a thread costs more than it
// saves).
template <class Body>
void parallel_for_ranges(int64_t n, int64_t grain, int num_threads, const Body& body) {
  const int64_t ranges =
      std::max<int64_t>(1, std::min<int64_t>(num_threads, n / std::max<int64_t>(grain, 1)));
  if (ranges == 1) {
    if (n > 0) body(int64_t{0}, n);
    return;
  }
#pragma omp parallel for num_threads(static_cast<int>(ranges)) schedule(static)
  for (int64_t i = 0; i < ranges; ++i) body(i * n / ranges, (i + 1) * n / ranges);
}

}  // namespace umt5_fast
