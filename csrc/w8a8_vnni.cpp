// AVX512-VNNI kernels of w8a8_linear (see w8a8_linear.h); the only translation unit built with
// -mavx512bw -mavx512vl -mavx512vnni, called only when cpu_supports_avx512_vnni().
//
// A tile is R activation rows x C weight blocks of 16 columns. Per 4 bytes of K, C 64-byte weight
// loads and R 4-byte activation broadcasts feed R * C vpdpbusd; lane j of accumulator (i, c) sums
// the products of row i and column j of block c, so each accumulator ends as 16 finished outputs
// (no horizontal sums). vpdpbusd multiplies unsigned by signed bytes, so the weights enter as
// w ^ 0x80 = w + 128 (unsigned) and the activations as they are (signed); the extra
// 128 * sum_k q[m, k] is subtracted at the end. The row layout's kernel (rows_in_tiles) feeds the
// same instruction 64 bytes of K of one weight row and one activation row at a time.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "w8a8_linear.h"

namespace umt5_fast {
namespace {

// acc + the products of unsigned bytes u and signed bytes s (vpdpbusd) in a tile of R activation
// rows. With the intrinsic GCC 12 copies every accumulator of a tile to another register and back
// (some through the stack) around each instruction, ~2 moves per vpdpbusd in the K loops; as
// inline assembly it does not (K = 512 on a Zen 4, the same bits: 16 or 1024 rows x 1024 columns
// in blocks 1.11-1.16x faster, the LM head's 16 rows in the row layout 1.19-1.24x). One-row tiles
// keep the intrinsic: they stream their weights at the memory's rate, and the assembly's fixed
// order streamed the LM head ~15% slower.
template <int R>
inline __m512i dot_bytes(__m512i acc, __m512i u, __m512i s) {
  if constexpr (R == 1) {
    return _mm512_dpbusd_epi32(acc, u, s);
  } else {
    asm("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(u), "v"(s));
    return acc;
  }
}

constexpr int kGroupBytes = 4 * kW8A8BlockColumns;  // one 4-byte group of K for 16 columns

template <int R, int C>
void blocks_in_tiles(const W8A8Problem& p, int64_t block_begin, int64_t block_end) {
  const int64_t K = p.in_features, groups = K / 4, block_bytes = kW8A8BlockColumns * K;
  const int tail = static_cast<int>(K % 4);
  const __m512i sign_flip = _mm512_set1_epi8(static_cast<char>(0x80));
  const int64_t row_block = w8a8_tiles::row_block(p.k_padded);

  for (int64_t m0 = 0; m0 < p.rows; m0 += row_block) {
    const int64_t m_end = std::min(p.rows, m0 + row_block);
    for (int64_t b = block_begin; b < block_end; b += C) {
      const int blocks_here = static_cast<int>(std::min<int64_t>(C, block_end - b));
      const int8_t* w[C];  // a partial tile repeats its last block, whose sums are not stored
      for (int c = 0; c < C; ++c) w[c] = p.w + (b + std::min(c, blocks_here - 1)) * block_bytes;
      __m512i tail_w[C];  // the K % 4 last entries of each column
      for (int c = 0; c < C; ++c) {
        alignas(64) int8_t lanes[kGroupBytes] = {};
        w8a8_tiles::gather_tail(w[c], groups, tail, lanes);
        tail_w[c] = _mm512_xor_si512(_mm512_load_si512(lanes), sign_flip);
      }

      for (int64_t m = m0; m < m_end; m += R) {  // rows past p.rows: zero padding of q
        const int8_t* q = p.q + m * p.k_padded;
        __m512i acc[R][C];
        for (auto& row : acc)
          for (auto& a : row) a = _mm512_setzero_si512();
        const auto accumulate = [&](const __m512i* wv, int64_t g) __attribute__((always_inline)) {
          for (int i = 0; i < R; ++i) {
            int32_t four;  // q[m + i][4g .. 4g + 3]
            std::memcpy(&four, q + i * p.k_padded + 4 * g, sizeof(four));
            const __m512i broadcast = _mm512_set1_epi32(four);
            for (int c = 0; c < C; ++c) acc[i][c] = dot_bytes<R>(acc[i][c], wv[c], broadcast);
          }
        };
        for (int64_t g = 0; g < groups; ++g) {
          __m512i wv[C];
          for (int c = 0; c < C; ++c)
            wv[c] = _mm512_xor_si512(_mm512_loadu_si512(w[c] + g * kGroupBytes), sign_flip);
          accumulate(wv, g);
        }
        if (tail) accumulate(tail_w, groups);

        // The same fp32 operations as the portable kernel: float(sum) * (x_scale * w_scale) + residual.
        const int rows_here = static_cast<int>(std::min<int64_t>(R, p.rows - m));
        for (int i = 0; i < rows_here; ++i) {
          const __m512i correction = _mm512_set1_epi32(p.q_sums[m + i] * 128);
          const __m512 x_scale = _mm512_set1_ps(p.x_scale[m + i]);
          for (int c = 0; c < blocks_here; ++c) {
            const int64_t n0 = (b + c) * kW8A8BlockColumns;
            const int columns = static_cast<int>(std::min<int64_t>(kW8A8BlockColumns, p.out_features - n0));
            const __mmask16 lanes = static_cast<__mmask16>((1u << columns) - 1);
            const int64_t at = (m + i) * p.out_features + n0;
            const __m512 w_scale = _mm512_maskz_loadu_ps(lanes, p.w_scale + n0);
            __m512 values = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(acc[i][c], correction)),
                                          _mm512_mul_ps(x_scale, w_scale));
            if (p.residual) values = _mm512_add_ps(values, _mm512_maskz_loadu_ps(lanes, p.residual + at));
            _mm512_mask_storeu_ps(p.y + at, lanes, values);
          }
        }
      }
    }
  }
}

// The row layout (w8a8_linear.h): each weight row's K bytes in 64-byte vectors, lane-wise sums
// over K per (activation row, weight row) pair, reduced across lanes once at the end of K. Lane j
// of the result is the sum of the sixteen lanes of a[j] (a 16 x 16 transpose-and-add in 45
// instructions, against ~3 per output for four at a time and a scalar epilogue after).
inline __m512i lane_sums_of_sixteen(const __m512i (&a)[16]) {
  // Pairs, then quads: per 128-bit chunk k of quad t, [sum of chunk k of a[4t + i]]_i.
  __m512i quads[4];
  for (int t = 0; t < 4; ++t) {
    __m512i pairs[2];
    for (int h = 0; h < 2; ++h) {
      const __m512i x = a[4 * t + 2 * h], y = a[4 * t + 2 * h + 1];
      pairs[h] = _mm512_add_epi32(_mm512_unpacklo_epi32(x, y), _mm512_unpackhi_epi32(x, y));
    }
    quads[t] = _mm512_add_epi32(_mm512_unpacklo_epi64(pairs[0], pairs[1]), _mm512_unpackhi_epi64(pairs[0], pairs[1]));
  }
  // The four chunks of each quad summed into chunk t: a 4 x 4 transpose of chunks, added.
  const auto chunk_pairs = [](__m512i x, __m512i y) {
    return _mm512_add_epi32(_mm512_shuffle_i32x4(x, y, _MM_SHUFFLE(2, 0, 2, 0)),
                            _mm512_shuffle_i32x4(x, y, _MM_SHUFFLE(3, 1, 3, 1)));
  };
  return chunk_pairs(chunk_pairs(quads[0], quads[1]), chunk_pairs(quads[2], quads[3]));
}

// How far ahead the row-layout kernel prefetches weight rows, in tiles: one tile ahead left the
// LM head's 3-12 activation rows waiting on memory (fewer row tiles per group of weight rows, so
// less work to hide the latency behind). 4 tiles, A/B on a Zen 4 (best of 40): 3-5 rows
// 1.26-1.78x, 8 rows 1.52x, 12 rows 1.1x faster; 1, 2 and 16 rows as before; 8 tiles no better.
constexpr int kPrefetchTiles = 4;

// A tile is R activation rows x C weight rows, R * C = 16 sums: one vector after the reduction,
// lane i * C + c for (row m + i, weight row n0 + c). Activation rows past p.rows are q's zero
// padding and are not stored; weight rows past row_end repeat the last one, not stored.
template <int R, int C>
void rows_in_tiles(const W8A8Problem& p, int64_t row_begin, int64_t row_end) {
  static_assert(R * C == 16, "one vector of sums per tile");
  const int64_t K = p.in_features, full = K / 64 * 64;
  const __mmask64 tail_bytes = (__mmask64{1} << (K - full)) - 1;
  const __m512i sign_flip = _mm512_set1_epi8(static_cast<char>(0x80));
  // lane j <- lane j % C: a row of C values repeated for each activation row of the tile
  const __m512i repeat_row = _mm512_and_si512(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                              _mm512_set1_epi32(C - 1));
  const int64_t row_block = w8a8_tiles::row_block(p.k_padded);
  for (int64_t m0 = 0; m0 < p.rows; m0 += row_block) {
    const int64_t m_end = std::min(p.rows, m0 + row_block);
    for (int64_t n0 = row_begin; n0 < row_end; n0 += C) {
      const int8_t* w[C];
      for (int c = 0; c < C; ++c) w[c] = p.w + std::min(n0 + c, row_end - 1) * K;
      const int columns = static_cast<int>(std::min<int64_t>(C, row_end - n0));
      const __mmask16 column_lanes = static_cast<__mmask16>((1u << columns) - 1);
      const __m512 w_scale = _mm512_permutexvar_ps(repeat_row, _mm512_maskz_loadu_ps(column_lanes, p.w_scale + n0));
      for (int64_t m = m0; m < m_end; m += R) {
        __m512i acc[R * C];
        for (auto& a : acc) a = _mm512_setzero_si512();
        // Adds 64 bytes of K (from byte `at` of q on) times the weight vectors weight(c).
        const auto accumulate = [&](int64_t at, auto weight) __attribute__((always_inline)) {
          __m512i q[R];
          for (int i = 0; i < R; ++i) q[i] = _mm512_loadu_si512(p.q + (m + i) * p.k_padded + at);
          for (int c = 0; c < C; ++c) {
            const __m512i wv = _mm512_xor_si512(weight(c), sign_flip);
            for (int i = 0; i < R; ++i) acc[i * C + c] = dot_bytes<R>(acc[i * C + c], wv, q[i]);
          }
        };
        // The rows kPrefetchTiles tiles ahead (contiguous), a slice per step into L2: each tile's C
        // short interleaved streams leave the hardware prefetcher behind. The first row tile
        // fetches.
        const char* next_tile = m == m0 && n0 + (kPrefetchTiles + 1) * C <= row_end
                                    ? reinterpret_cast<const char*>(w[0] + kPrefetchTiles * C * K)
                                    : nullptr;
        for (int64_t k = 0; k < full; k += 64) {
          if (next_tile)
            for (int line = 0; line < C * 64; line += 64) __builtin_prefetch(next_tile + C * k + line, 0, 1);
          accumulate(k, [&](int c) { return _mm512_loadu_si512(w[c] + k); });
        }
        if (full < K)  // weight bytes past K load as 0 (128 after the flip) and meet q's zero padding
          accumulate(full, [&](int c) { return _mm512_maskz_loadu_epi8(tail_bytes, w[c] + full); });

        // The portable kernel's fp32 operations, sixteen at a time: float(sum - 128 * q_sum)
        // (vpdpbusd's w + 128) * (x_scale * w_scale) + residual. Rows past p.rows read q's padding.
        const int rows_here = static_cast<int>(std::min<int64_t>(R, p.rows - m));
        __m512i correction = _mm512_set1_epi32(p.q_sums[m] * 128);
        __m512 x_scale = _mm512_set1_ps(p.x_scale[m]);
        for (int i = 1; i < R; ++i) {
          const __mmask16 row_lanes = static_cast<__mmask16>(((1u << C) - 1) << (i * C));
          correction = _mm512_mask_mov_epi32(correction, row_lanes, _mm512_set1_epi32(p.q_sums[m + i] * 128));
          x_scale = _mm512_mask_mov_ps(x_scale, row_lanes, _mm512_set1_ps(p.x_scale[m + i]));
        }
        __m512 values = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(lane_sums_of_sixteen(acc), correction)),
                                      _mm512_mul_ps(x_scale, w_scale));
        for (int i = 0; i < rows_here; ++i) {
          // row i's C lanes moved down to lanes [0, C)
          const __m512 row = i == 0 ? values : _mm512_permutexvar_ps(_mm512_add_epi32(
              repeat_row, _mm512_set1_epi32(i * C)), values);
          float* y = p.y + (m + i) * p.out_features + n0;
          _mm512_mask_storeu_ps(y, column_lanes, p.residual ? _mm512_add_ps(row, _mm512_maskz_loadu_ps(
              column_lanes, p.residual + (m + i) * p.out_features + n0)) : row);
        }
      }
    }
  }
}

}  // namespace

// w8a8_quantise_row_portable sixteen lanes at a time: the same products, and rounding to nearest
// even by roundscale where the portable one adds and subtracts 1.5 * 2^23 (equal for |v| <= 127).
void w8a8_quantise_row_vnni(const float* row, int64_t k, int8_t* q, int32_t* sum, float* scale) {
  const __m512i no_sign = _mm512_set1_epi32(0x7FFFFFFF);
  const auto lanes = [k](int64_t i) {
    return static_cast<__mmask16>(k - i >= 16 ? 0xFFFF : (1u << (k - i)) - 1);
  };
  __m512 amax = _mm512_setzero_ps();
  __mmask16 non_finite = 0;
  for (int64_t i = 0; i < k; i += 16) {
    const __m512 magnitude = _mm512_castsi512_ps(
        _mm512_and_si512(_mm512_castps_si512(_mm512_maskz_loadu_ps(lanes(i), row + i)), no_sign));
    non_finite |= _mm512_cmp_ps_mask(magnitude, _mm512_set1_ps(3.4028235e38f), _CMP_NLE_UQ);  // inf, NaN
    amax = _mm512_max_ps(amax, magnitude);
  }
  if (non_finite) {
    *scale = NAN;  // NaN outputs, as the eager reference gives
    return;
  }
  const float row_max = _mm512_reduce_max_ps(amax);
  if (row_max == 0.0f) return;
  const __m512 inverse = _mm512_set1_ps(w8a8_inverse_scale(row_max));
  *scale = w8a8_row_scale(row_max);
  __m512i total = _mm512_setzero_si512();
  for (int64_t i = 0; i < k; i += 16) {
    const __mmask16 mask = lanes(i);
    __m512 v = _mm512_mul_ps(_mm512_maskz_loadu_ps(mask, row + i), inverse);
    v = _mm512_min_ps(_mm512_max_ps(v, _mm512_set1_ps(-127.0f)), _mm512_set1_ps(127.0f));
    const __m512i values = _mm512_cvtps_epi32(_mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    total = _mm512_add_epi32(total, values);  // masked-off lanes are 0
    _mm_mask_storeu_epi8(q + i, mask, _mm512_cvtepi32_epi8(values));
  }
  *sum = _mm512_reduce_add_epi32(total);
}

// One row (decoding one sequence) streams the weights: eight blocks at once keep eight
// independent sums in flight. More rows reuse each weight vector R times. The C of each tile is
// w8a8_tile_blocks(rows), by which run_w8a8_linear cuts the blocks among threads.
void w8a8_blocks_vnni(const W8A8Problem& p, int64_t block_begin, int64_t block_end) {
  if (p.rows == 1)
    blocks_in_tiles<1, 8>(p, block_begin, block_end);
  else if (p.rows == 2)
    blocks_in_tiles<2, 4>(p, block_begin, block_end);
  else
    blocks_in_tiles<4, 4>(p, block_begin, block_end);
}

// One activation row streams sixteen weight rows at once (sixteen independent sums), two rows
// eight; more rows take four by four, which loads each weight vector (and flips its sign bits) once
// per four rows (16 rows of the LM head: ~1.35x the blocks kernel's time with two rows of eight
// weight rows and a scalar epilogue, ~1.12x as now).
void w8a8_rows_vnni(const W8A8Problem& p, int64_t row_begin, int64_t row_end) {
  if (p.rows == 1)
    rows_in_tiles<1, 16>(p, row_begin, row_end);
  else if (p.rows == 2)
    rows_in_tiles<2, 8>(p, row_begin, row_end);
  else
    rows_in_tiles<4, 4>(p, row_begin, row_end);
}

}  // namespace umt5_fast
