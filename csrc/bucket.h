// T5 relative-position bucket: the C++ mirror of umt5_fast.buckets.relative_position_bucket.
//
// The log is taken in float32 and truncated toward zero exactly as the torch definition does
// (float32 division by max_exact, float32 log, division by log(max_distance / max_exact) computed
// in double and rounded to float, float32 product, truncation), so the integer agrees at every
// position; tests/test_cpu_kernels.py checks all of [-8192, 8192] for several configurations.
// Keep this file free of -ffast-math and FMA contraction (nothing here is ISA-specific).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

namespace umt5_fast {

// Bucket of `relative_position = key_position - query_position`. Needs max_exact =
// (bidirectional ? num_buckets / 2 : num_buckets) / 2 >= 1 and max_distance > max_exact
// (checked by the Python wrapper).
inline int relative_position_bucket(int64_t relative_position, bool bidirectional,
                                    int num_buckets, int max_distance) {
  int bucket = 0;
  if (bidirectional) {
    num_buckets /= 2;
    if (relative_position > 0) bucket += num_buckets;
    relative_position = relative_position < 0 ? -relative_position : relative_position;
  } else {
    relative_position = relative_position < 0 ? -relative_position : 0;
  }
  const int max_exact = num_buckets / 2;
  if (relative_position < max_exact) return bucket + static_cast<int>(relative_position);
  // From max_distance on, the formula below yields at least max_exact + (num_buckets - max_exact)
  // * (1 - ulp), truncated to >= num_buckets - 1, and logf is monotone: the last bucket. Saying
  // so skips the log for the long tail of distances (decode steps compute one per cached key).
  if (relative_position >= max_distance) return bucket + num_buckets - 1;
  const float log_ratio =
      std::log(static_cast<float>(relative_position) / static_cast<float>(max_exact)) /
      static_cast<float>(std::log(static_cast<double>(max_distance) / max_exact));
  const int64_t if_large =
      max_exact + static_cast<int64_t>(log_ratio * static_cast<float>(num_buckets - max_exact));
  return bucket + static_cast<int>(std::min<int64_t>(if_large, num_buckets - 1));
}

}  // namespace umt5_fast
