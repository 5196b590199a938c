// Fused attention on bf16 q, k, v with AMX: each tdpbf16ps multiplies a 16 x 32 bf16 tile by a
// 32 x 16 one (pairs along the sum, as vdpbf16ps) into 16 x 16 fp32 sums, 8x the vdpbf16ps rate
// per core. The block layout is the AVX512-BF16 kernel's (query rows in lanes, so its online
// softmax and pair packing are shared), with both products transposed so that rows stay the
// tiles' columns:
// - scores^T [keys][rows] = K [keys][dims] x q pairs [dim pairs][rows]: K rows, packed once per
//   call with dims padded to 32, are the A tiles;
// - out^T [dims][rows] += V^T [dims][keys] x p pairs [key pairs][rows]: V^T, packed once per
//   call, holds the A tiles; the accumulator lives in memory, rescaled per key tile by the
//   online softmax, and passes through the C tiles.
// Every tile is 16 rows of 64 bytes; blocks of up to 32 query rows use two column tiles.
// Padding (dims to 32, keys by kAmxKeyPad, zero pairs past a tile's last key) keeps every tile
// whole, so there is one tile configuration.
//
// Compiled with kernels_avx512.cpp's flags; only the functions marked UMT5_FAST_AMX_TARGET use
// AMX, and run_attention calls them only where cpu_supports_amx_attention().
#include "attention_amx.h"

#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <stdexcept>

#include "attention.h"
#include "vec_avx512.h"
#include "attention_bf16_pairs.h"

#define UMT5_FAST_AMX_TARGET \
  __attribute__((target("amx-tile,amx-bf16,avx512bw,avx512vl,avx512bf16")))

namespace umt5_fast {
namespace {

using namespace bf16_pairs;
constexpr int kTileRows = 16;
constexpr int kTileBf16 = 32;  // bf16 numbers (or 16 pairs) in a tile row of 64 bytes
constexpr int kKeyTile = 128;  // keys per online-softmax step
constexpr int64_t kTransposedRowBytes = kRowStride * sizeof(float);
static_assert(kKeyTile % kTileBf16 == 0 && kRowStride == 2 * kTileRows, "tiles cover a block");

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t bytes_per_row[16] = {};
  uint8_t rows[16] = {};
};

UMT5_FAST_AMX_TARGET void configure_tiles() {
  TileConfig config;
  for (int t = 0; t < 8; ++t) {
    config.bytes_per_row[t] = 64;
    config.rows[t] = kTileRows;
  }
  _tile_loadconfig(&config);
}

// ARCH_REQ_XCOMP_PERM for XFEATURE_XTILEDATA: Linux hands the tile state to a process only
// after it asks (once; later calls succeed at no cost).
bool os_grants_tile_state() {
  constexpr long kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
}

// CPUID leaf 7: EDX bit 22 AMX-BF16, bit 24 AMX-TILE.
bool cpu_has_amx_bf16() {
  static const bool has = amx_allowed() && [] {
    unsigned eax, ebx, ecx, edx;
    if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) return false;
    return (edx >> 22 & 1u) && (edx >> 24 & 1u) && os_grants_tile_state();
  }();
  return has;
}

std::atomic<bool> amx_enabled_flag{true};

// The C tiles 0-3 hold a 32 x 32 block of fp32 sums at c ([rows][kRowStride]): tile 2v + i is
// rows 16i.. and columns 16v..; NQ column tiles (tiles 2, 3 only when NQ is 2).
template <int NQ>
UMT5_FAST_AMX_TARGET inline void zero_sums() {
  _tile_zero(0);
  _tile_zero(1);
  if constexpr (NQ == 2) {
    _tile_zero(2);
    _tile_zero(3);
  }
}

template <int NQ>
UMT5_FAST_AMX_TARGET inline void load_sums(const float* c) {
  _tile_loadd(0, c, kTransposedRowBytes);
  _tile_loadd(1, c + kTileRows * kRowStride, kTransposedRowBytes);
  if constexpr (NQ == 2) {
    _tile_loadd(2, c + kTileRows, kTransposedRowBytes);
    _tile_loadd(3, c + kTileRows * kRowStride + kTileRows, kTransposedRowBytes);
  }
}

template <int NQ>
UMT5_FAST_AMX_TARGET inline void store_sums(float* c) {
  _tile_stored(0, c, kTransposedRowBytes);
  _tile_stored(1, c + kTileRows * kRowStride, kTransposedRowBytes);
  if constexpr (NQ == 2) {
    _tile_stored(2, c + kTileRows, kTransposedRowBytes);
    _tile_stored(3, c + kTileRows * kRowStride + kTileRows, kTransposedRowBytes);
  }
}

// The C tiles += a x b over `steps` products of 32 along the sum: a is 32 rows of bf16
// a_row_stride apart (two A tiles), b the pairs [steps * 16][kRowStride] (NQ B tiles per step).
template <int NQ>
UMT5_FAST_AMX_TARGET inline void add_tile_products(const uint16_t* a, int64_t a_row_stride,
                                                   const uint32_t* b, int steps) {
  const int64_t a_bytes = a_row_stride * sizeof(uint16_t);
  for (int s = 0; s < steps; ++s) {
    _tile_loadd(4, a + s * kTileBf16, a_bytes);
    _tile_loadd(5, a + kTileRows * a_row_stride + s * kTileBf16, a_bytes);
    _tile_loadd(6, b + s * kTileRows * kRowStride, kTransposedRowBytes);
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 5, 6);
    if constexpr (NQ == 2) {
      _tile_loadd(7, b + s * kTileRows * kRowStride + kTileRows, kTransposedRowBytes);
      _tile_dpbf16ps(2, 4, 7);
      _tile_dpbf16ps(3, 5, 7);
    }
  }
}

// scores_t[c][r] = q row r . key (first_key + c) for c < round_up(num_keys, 32), NQ tiles of 16
// rows; 32 keys (two A tiles) per pass, 32 dims per product.
template <int NQ>
UMT5_FAST_AMX_TARGET void score_tile(const AttentionBlockAmx& b, const uint32_t* q_pairs,
                                     int64_t first_key, int num_keys, float* scores_t) {
  const int dim_steps = static_cast<int>(b.k_row_stride / kTileBf16);
  for (int c0 = 0; c0 < num_keys; c0 += 2 * kTileRows) {
    zero_sums<NQ>();
    add_tile_products<NQ>(b.k_rows + (first_key + c0) * b.k_row_stride, b.k_row_stride, q_pairs,
                          dim_steps);
    store_sums<NQ>(scores_t + c0 * kRowStride);
  }
}

// acc_t[d][r] = acc_t[d][r] * rescale[r] + sum over the tile's keys of v[key][d] p[r][key].
template <int NQ>
UMT5_FAST_AMX_TARGET void accumulate_values(const AttentionBlockAmx& b, const uint32_t* p_pairs,
                                            const float* rescale, int64_t first_key, int num_keys,
                                            float* acc_t) {
  const int64_t dims = b.k_row_stride;  // V^T has as many (padded) rows as K has dims
  __m512 factors[NQ];
  for (int v = 0; v < NQ; ++v) factors[v] = _mm512_loadu_ps(rescale + v * kLanes);
  for (int64_t d = 0; d < dims; ++d)
    for (int v = 0; v < NQ; ++v) {
      float* acc = acc_t + d * kRowStride + v * kLanes;
      _mm512_storeu_ps(acc, _mm512_mul_ps(_mm512_loadu_ps(acc), factors[v]));
    }
  const int key_steps = (num_keys + kTileBf16 - 1) / kTileBf16;
  for (int64_t d0 = 0; d0 < dims; d0 += 2 * kTileRows) {
    float* acc = acc_t + d0 * kRowStride;
    load_sums<NQ>(acc);
    add_tile_products<NQ>(b.v_t + d0 * b.v_t_row_stride + first_key, b.v_t_row_stride, p_pairs,
                          key_steps);
    store_sums<NQ>(acc);
  }
}

// out[r][d] = acc_t[d][r] / running_sum[r], rounded to bf16: 16 x 16 blocks of acc_t transposed
// in registers, so that each row's dims leave in one store (acc_t has its dims padded to 32).
template <int NQ>
UMT5_FAST_BF16_TARGET void store_rows(const AttentionBlockBf16& b, const float* acc_t,
                                      const float* running_sum) {
  for (int v = 0; v < NQ; ++v) {
    const __m512 inverse_sum = _mm512_div_ps(_mm512_set1_ps(1.0f), _mm512_loadu_ps(running_sum + v * kLanes));
    const int rows = std::min(kLanes, b.num_rows - v * kLanes);
    for (int d0 = 0; d0 < b.head_dim; d0 += kLanes) {
      __m512 block[kLanes];
      for (int i = 0; i < kLanes; ++i)
        block[i] = _mm512_mul_ps(_mm512_loadu_ps(acc_t + (d0 + i) * kRowStride + v * kLanes), inverse_sum);
      Vec<CpuIsa::avx512>::transpose(block);  // block[r]: dims d0.. of row v * kLanes + r
      const auto dims = static_cast<__mmask16>((1u << std::min(kLanes, b.head_dim - d0)) - 1);
      for (int r = 0; r < rows; ++r)
        _mm256_mask_storeu_epi16(b.out + (v * kLanes + r) * b.out_row_stride + d0, dims,
                                 (__m256i)_mm512_cvtneps_pbh(block[r]));
    }
  }
}

template <int NQ>
UMT5_FAST_AMX_TARGET void attention_rows_amx(const AttentionBlockAmx& block, float* scratch_floats) {
  const AttentionBlockBf16& b = block.rows;
  const int64_t dims = block.k_row_stride;
  const PairScratch s(scratch_floats, dims / 2, dims, kKeyTile);  // s.acc: out^T [dims][rows]
  pack_query_pairs(b, static_cast<int>(dims / 2), s.q_pairs);
  configure_tiles();
  // Tiles start at even keys, so key pairs are whole (a key before key_begin is padding, masked
  // to probability 0 by its key term).
  for (int64_t j0 = b.key_begin / 2 * 2; j0 < b.key_end; j0 += kKeyTile) {
    const int num_keys = static_cast<int>(std::min<int64_t>(kKeyTile, b.key_end - j0));
    score_tile<NQ>(block, s.q_pairs, j0, num_keys, s.scores_t);
    softmax_step_to_pairs<NQ>(
        s.scores_t, num_keys, b.position_term_reversed ? b.position_term_reversed - j0 : nullptr,
        b.key_term ? b.key_term + j0 : nullptr, s.running_max, s.running_sum, s.rescale, s.p_pairs);
    // Pairs past the last key up to the 32-key step meet real V columns: they must be 0.
    const int pairs = (num_keys + 1) / 2;
    const int padded_pairs = (num_keys + kTileBf16 - 1) / kTileBf16 * kTileRows;
    std::fill(s.p_pairs + pairs * kRowStride, s.p_pairs + padded_pairs * kRowStride, 0u);
    accumulate_values<NQ>(block, s.p_pairs, s.rescale, j0, num_keys, s.acc);
  }
  _tile_release();
  store_rows<NQ>(b, s.acc, s.running_sum);
}

}  // namespace

bool cpu_supports_amx_attention() {
  return cpu_supports_bf16_attention() && cpu_has_amx_bf16();  // the ISA may change at run time
}

bool amx_attention_enabled() {
  return amx_enabled_flag.load(std::memory_order_relaxed) && cpu_supports_amx_attention();
}

void enable_amx_attention(bool enabled) {
  if (enabled && !cpu_supports_amx_attention())
    throw std::invalid_argument("AMX attention needs a CPU with AMX-BF16 (and AVX512-BF16 with the "
                                "avx512 ISA selected) whose OS grants the tile state");
  amx_enabled_flag.store(enabled, std::memory_order_relaxed);
}

int64_t amx_padded_dims(int head_dim) { return kernels::round_up(head_dim, kTileBf16); }

int64_t attention_amx_scratch_floats(int head_dim) {
  const int64_t dims = amx_padded_dims(head_dim);
  return PairScratch::floats(dims / 2, dims, kKeyTile);
}

void attention_block_amx(const AttentionBlockAmx& block, float* scratch) {
  if (block.rows.num_rows <= kLanes)
    attention_rows_amx<1>(block, scratch);
  else
    attention_rows_amx<2>(block, scratch);
}

void pack_keys_for_amx(const uint16_t* k, int64_t k_row_stride, int64_t key_length, int head_dim,
                       uint16_t* k_rows) {
  const int64_t dims = amx_padded_dims(head_dim);
  for (int64_t j = 0; j < key_length + kAmxKeyPad; ++j) {
    uint16_t* row = k_rows + j * dims;
    const int copied = j < key_length ? head_dim : 0;
    if (copied) std::memcpy(row, k + j * k_row_stride, copied * sizeof(uint16_t));
    std::fill(row + copied, row + dims, uint16_t{0});
  }
}

void pack_values_for_amx(const uint16_t* v, int64_t v_row_stride, int64_t key_length, int head_dim,
                         uint16_t* v_t) {
  const int64_t dims = amx_padded_dims(head_dim), columns = key_length + kAmxKeyPad;
  std::fill(v_t, v_t + dims * columns, uint16_t{0});
  for (int64_t j = 0; j < key_length; ++j)
    for (int d = 0; d < head_dim; ++d) v_t[d * columns + j] = v[j * v_row_stride + d];
}

}  // namespace umt5_fast
