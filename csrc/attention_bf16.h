// The bf16 attention block kernel (attention_bf16.cpp), run by run_attention (attention.cpp) for
// bf16 problems on CPUs with AVX512-BF16.
#pragma once

#include <cstdint>

#include "kernels.h"

namespace umt5_fast {

// bf16 numbers travel as their bits; V as pairs of keys: lane d of pair c holds
// v[2c][d] | v[2c + 1][d] << 16 (the operand layout of vdpbf16ps), d_padded lanes per pair.
struct AttentionBlockBf16 {
  const uint16_t* q;  // first query row of the block; rows q_row_stride apart
  int64_t q_row_stride;
  const uint16_t* k;  // key 0 of this (batch, head)
  int64_t k_row_stride;
  const uint32_t* v_pairs;  // pair 0 of this (batch, head): [(Lk + 1) / 2][d_padded], zero padded
  int64_t d_padded;         // head_dim rounded up to 16
  uint16_t* out;            // output row of the first query; rows out_row_stride apart
  int64_t out_row_stride;
  int num_rows;  // <= kernels::kAttentionMaxRows
  int head_dim;
  float scale;
  // As in kernels::AttentionBlock: keys outside [key_begin, key_end) are skipped; position terms
  // of (row r, key j) at position_term_reversed[r - j]; key terms at key_term[j].
  int64_t key_begin, key_end;
  const float* position_term_reversed;
  const float* key_term;
};

// Floats of per-thread scratch attention_block_bf16 needs for this head_dim.
int64_t attention_bf16_scratch_floats(int head_dim);

// softmax(scale * q k^T + terms) v for each row of the block, rounded to bf16 (rows whose keys
// are all masked come out as a softmax over the processed keys only: the caller overwrites them).
void attention_block_bf16(const AttentionBlockBf16& block, float* scratch);

// v_pairs for keys [0, key_length) of one (batch, head): v rows of bf16 bits, v_row_stride apart.
void pack_value_pairs(const uint16_t* v, int64_t v_row_stride, int64_t key_length, int head_dim,
                      int64_t d_padded, uint32_t* v_pairs);

}  // namespace umt5_fast
