// The bf16 attention block kernel on AMX tiles (attention_amx.cpp), run by run_attention
// (attention.cpp) for bf16 problems of at least kAmxMinRows query rows on CPUs with AMX-BF16.
#pragma once

#include <cstdint>

#include "attention_bf16.h"

namespace umt5_fast {

// Fewer query rows leave most of a 16-row tile empty, and the per-call packing of K and V
// (O(Lk D)) would rival the attention itself: such problems take attention_block_bf16.
constexpr int64_t kAmxMinRows = 16;
// Zero rows (keys) past the last key in the packed K and V^T: tiles cover 32 keys at a time.
constexpr int64_t kAmxKeyPad = 32;

struct AttentionBlockAmx {
  AttentionBlockBf16 rows;  // q, out, scale, key range and terms (v_pairs, d_padded unused)
  // K as rows of round_up(head_dim, 32) dims, zero padded, for keys [0, Lk + kAmxKeyPad).
  const uint16_t* k_rows;
  int64_t k_row_stride;
  // V transposed: round_up(head_dim, 32) rows of keys [0, Lk + kAmxKeyPad), zero padded.
  const uint16_t* v_t;
  int64_t v_t_row_stride;
};

// AMX-BF16 and AMX-TILE present, the OS grants this process the tile state (Linux
// arch_prctl(ARCH_REQ_XCOMP_PERM)), and the AVX512-BF16 kernel's conditions hold.
bool cpu_supports_amx_attention();
// Whether run_attention uses the AMX kernel where it can (default: wherever it is supported).
bool amx_attention_enabled();
// Tests run both bf16 kernels on one CPU; enabling throws std::invalid_argument without AMX.
void enable_amx_attention(bool enabled);

int64_t attention_amx_scratch_floats(int head_dim);

// As attention_block_bf16, with the same rounding: q k^T and p v as bf16 products summed in fp32.
void attention_block_amx(const AttentionBlockAmx& block, float* scratch);

// k_rows and v_t (layouts above) of one (batch, head) from rows of bf16 bits.
int64_t amx_padded_dims(int head_dim);
void pack_keys_for_amx(const uint16_t* k, int64_t k_row_stride, int64_t key_length, int head_dim,
                       uint16_t* k_rows);
void pack_values_for_amx(const uint16_t* v, int64_t v_row_stride, int64_t key_length, int head_dim,
                         uint16_t* v_t);

}  // namespace umt5_fast
