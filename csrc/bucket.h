// T5 relative-position bucket, looked up in umt5_fast.buckets.distance_buckets' table.
//
// The table holds, for each distance d < max_distance (and below buckets.MAX_TABLE_DISTANCE: the
// Python side refuses longer distances then), the bucket of relative position -d that
// umt5_fast.buckets.relative_position_bucket gives, which is transformers' arithmetic in torch
// (float32 log, truncated). A log computed here would not do: torch's float32 log is not correctly
// rounded (~5% of values are 1 ulp from the libm one), and where the ratio of logs lands exactly
// on a bucket boundary (distance 15 with 19 buckets and max distance 25: log(15/9) / log(25/9) =
// 1/2) the two truncate to different buckets.
#pragma once

#include <cstdint>

namespace umt5_fast {

// Bucket of `relative_position = key_position - query_position`. Distances below max_exact (half
// of a direction's buckets) have a bucket each; from max_distance on every distance takes the
// last bucket of its direction; distance_buckets (see above) holds those between.
inline int relative_position_bucket(int64_t relative_position, bool bidirectional, int num_buckets,
                                    int max_distance, const int32_t* distance_buckets) {
  const int direction_buckets = bidirectional ? num_buckets / 2 : num_buckets;
  const int direction = bidirectional && relative_position > 0 ? direction_buckets : 0;
  const int64_t distance = bidirectional ? (relative_position < 0 ? -relative_position : relative_position)
                                         : (relative_position < 0 ? -relative_position : 0);
  if (distance < direction_buckets / 2) return direction + static_cast<int>(distance);
  if (distance >= max_distance) return direction + direction_buckets - 1;
  return direction + distance_buckets[distance];
}

}  // namespace umt5_fast
