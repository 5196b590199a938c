// Fused relative-position attention on fp32 [B, H, L, D] views: shared by attention.cpp (prefill,
// encoder, cross-attention) and decode_attention.cpp (one query row against the cache).
#pragma once

#include <array>
#include <cstdint>

namespace umt5_fast {

struct AttentionProblem {
  // q: [B, H, Lq, D], k/v: [B, H, Lk, D]; strides in elements for (batch, head, row), rows
  // contiguous.
  const float* q;
  std::array<int64_t, 3> q_strides;
  const float* k;
  std::array<int64_t, 3> k_strides;
  const float* v;
  std::array<int64_t, 3> v_strides;
  float* out;  // [B, Lq, H, D], contiguous
  int64_t batch, heads, query_length, key_length;
  int head_dim;
  const float* bias_table;  // [num_buckets, H] contiguous, or nullptr (no position bias)
  int num_buckets, max_distance;
  bool bidirectional;
  const uint8_t* key_padding_mask;  // [B, >= Lk], nonzero keeps the key; nullptr: keep all
  int64_t mask_batch_stride;
  bool causal;
  int64_t query_offset;  // position of query row 0 (keys sit at 0 .. Lk - 1)
  float scale;
  int num_threads;
};

// out = softmax(scale * q k^T + bias[bucket(j - i - query_offset)], masked) v, with the
// semantics of umt5_fast.ops.eager.attention. Parallel over (batch, head, query block); extra
// memory O(H (Lq + Lk) + B Lk) shared plus O(D) per thread.
void run_attention(const AttentionProblem& problem);

}  // namespace umt5_fast
