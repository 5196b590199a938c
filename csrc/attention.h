// Fused relative-position attention on fp32, bf16 or fp16 [B, H, L, D] views: shared by attention.cpp
// (prefill, encoder, cross-attention), decode_attention.cpp (one query row against the cache) and
// the decoder step.
#pragma once

#include <array>
#include <cstdint>

#include "kernels.h"

namespace umt5_fast {

struct AttentionProblem {
  // q: [B, H, Lq, D], k/v: [B, H, Lk, D]; strides in elements for (batch, head, row), rows
  // contiguous. Elements are floats, bf16 bits (uint16_t) when element is bf16, Fp16 when f16.
  const void* q;
  std::array<int64_t, 3> q_strides;
  const void* k;
  std::array<int64_t, 3> k_strides;
  const void* v;
  std::array<int64_t, 3> v_strides;
  void* out;  // [B, Lq, H, D], contiguous
  int64_t batch, heads, query_length, key_length;
  int head_dim;
  const float* bias_table;  // [num_buckets, H] contiguous, or nullptr (no position bias)
  const int32_t* distance_buckets;  // umt5_fast.buckets.distance_buckets (bucket.h), with bias_table
  int num_buckets, max_distance;
  bool bidirectional;
  const uint8_t* key_padding_mask;  // [B, >= Lk], nonzero keeps the key; nullptr: keep all
  int64_t mask_batch_stride;
  bool causal;
  int64_t query_offset;  // position of query row 0 (keys sit at 0 .. Lk - 1)
  float scale;
  int num_threads;
  AttentionElement element = AttentionElement::f32;
  // q and out in fp32 while k and v hold `element` (bf16 / fp16): how the fp32 kernel runs a
  // half-precision problem, reading K/V as they are (run_attention sets it up; callers need not).
  bool fp32_query_and_out = false;
};

// out = softmax(scale * q k^T + bias[bucket(j - i - query_offset)], masked) v, with the
// semantics of umt5_fast.ops.eager.attention. Parallel over (batch, head, query block); extra
// memory O(H (Lq + Lk) + B Lk) shared plus O(D) per thread, and for bf16 a copy of V in key
// pairs, O(B H Lk D).
//
// bf16 runs the AVX512-BF16 kernel (attention_bf16.cpp, or AMX tiles): q k^T and p v as bf16
// pair products summed in fp32 (p rounded to bf16, as transformers' bf16 attention rounds its
// softmax), the softmax in fp32, the output rounded once. Where it cannot run, bf16 problems take
// the fp32 kernel on an exactly widened copy of q, reading K/V as they are and widening them as
// they are loaded (one query row), a key tile at a time (one block of several rows) or into fp32
// copies (several blocks): the same bits as on widened copies, the output rounded once; fp16
// problems always do.
void run_attention(const AttentionProblem& problem);

// Whether run_attention runs bf16 problems on bf16 products: AVX512-BF16 (with BW, VL) present
// and the selected ISA is avx512.
bool cpu_supports_bf16_attention();

}  // namespace umt5_fast
