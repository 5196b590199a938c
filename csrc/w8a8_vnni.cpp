// AVX512-VNNI kernel of w8a8_linear (see w8a8_linear.h); the only translation unit built with
// -mavx512bw -mavx512vnni, called only when cpu_supports_avx512_vnni().
//
// A tile is 4 activation rows x 4 weight rows (1 x 16 for one or two rows): per 64 bytes of K,
// eight loads feed 16 vpdpbusd, each accumulating 16 lanes of 4-byte dot products of one (row, column)
// pair. vpdpbusd multiplies unsigned by signed bytes, so the weights enter as w ^ 0x80 = w + 128
// (unsigned) and the activations as they are (signed); the extra 128 * sum_k q[m, k] is subtracted
// at the end. The 16 accumulators are then summed across lanes in one transpose-and-add tree.
#include <immintrin.h>

#include <algorithm>
#include <cstdint>

#include "w8a8_linear.h"

namespace umt5_fast {
namespace {

// Lane i of the result = the sum of the lanes of v[i]. Forced inline (as the chunk lambda below):
// when the accumulators' address escapes, GCC keeps them in memory and the kernel runs 2x slower.
__attribute__((always_inline)) inline __m512i sum_lanes_of_16(const __m512i* v) {
  __m512i pairs[8], quads[4];
  for (int j = 0; j < 8; ++j)  // per 128-bit lane: [v0 0+2, v1 0+2, v0 1+3, v1 1+3]
    pairs[j] = _mm512_add_epi32(_mm512_unpacklo_epi32(v[2 * j], v[2 * j + 1]),
                                _mm512_unpackhi_epi32(v[2 * j], v[2 * j + 1]));
  for (int j = 0; j < 4; ++j)  // per 128-bit lane: the partial sums of v[4j .. 4j+3]
    quads[j] = _mm512_add_epi32(_mm512_unpacklo_epi64(pairs[2 * j], pairs[2 * j + 1]),
                                _mm512_unpackhi_epi64(pairs[2 * j], pairs[2 * j + 1]));
  const auto halve = [](__m512i a, __m512i b) {  // [a L0+L1, a L2+L3, b L0+L1, b L2+L3]
    return _mm512_add_epi32(_mm512_shuffle_i32x4(a, b, _MM_SHUFFLE(2, 0, 2, 0)),
                            _mm512_shuffle_i32x4(a, b, _MM_SHUFFLE(3, 1, 3, 1)));
  };
  return halve(halve(quads[0], quads[1]), halve(quads[2], quads[3]));
}

// Tiles of R activation rows x C weight rows, R * C = 16 accumulators.
template <int R, int C>
void columns_in_tiles(const W8A8Problem& p, int64_t n_begin, int64_t n_end) {
  const int64_t K = p.in_features, chunks = p.k_padded / kW8A8KPad;
  const int tail = static_cast<int>(K - (chunks - 1) * kW8A8KPad);  // bytes of the last chunk
  const __mmask64 tail_mask = tail == 64 ? ~__mmask64{0} : (__mmask64{1} << tail) - 1;
  const __m512i sign_flip = _mm512_set1_epi8(static_cast<char>(0x80));
  // Activation rows per block: about 256 KiB of them stay in L2 while the columns pass.
  const int64_t row_block = std::max<int64_t>(kW8A8TileRows, (int64_t{256} << 10) / p.k_padded);
  // Lane l of the result tile: row l / C, column l % C.
  alignas(64) int32_t lane_rows[16];
  for (int l = 0; l < 16; ++l) lane_rows[l] = l / C;
  const __m512i row_of_lane = _mm512_load_si512(lane_rows);
  const __mmask16 tile_rows = static_cast<__mmask16>((1u << R) - 1);

  for (int64_t m0 = 0; m0 < p.rows; m0 += row_block) {
    const int64_t m_end = std::min(p.rows, m0 + row_block);
    for (int64_t n = n_begin; n < n_end; n += C) {
      const int columns = static_cast<int>(std::min<int64_t>(C, n_end - n));
      const int8_t* w[C];  // a partial tile repeats its last column, which is not stored
      alignas(64) float lane_w_scales[16];
      for (int j = 0; j < C; ++j) w[j] = p.w + (n + std::min(j, columns - 1)) * K;
      for (int l = 0; l < 16; ++l) lane_w_scales[l] = p.w_scale[n + std::min(l % C, columns - 1)];
      const __m512 w_scales = _mm512_load_ps(lane_w_scales);
      const __mmask16 row_columns = static_cast<__mmask16>((1u << columns) - 1);
      for (int64_t m = m0; m < m_end; m += R) {  // rows past p.rows: zero padding of q
        const int8_t* q = p.q + m * p.k_padded;
        __m512i acc[16];
        for (auto& a : acc) a = _mm512_setzero_si512();
        // Full 64-byte chunks, then the last one with a byte mask (no per-chunk mask select).
        // The next tile's weight rows (C * K contiguous bytes, wherever they lie: this column
        // block's or the next one's) are prefetched into L2 during the first row tile: streaming
        // C rows at once defeats the hardware prefetcher at decode sizes.
        const char* next_tile = reinterpret_cast<const char*>(p.w + (n + C) * K);
        const bool prefetch = m == m0 && n + C < p.out_features;
        const auto accumulate = [&](int64_t offset, __mmask64 mask) __attribute__((always_inline)) {
          if (prefetch)
            for (int j = 0; j < C; ++j) _mm_prefetch(next_tile + offset * C + j * 64, _MM_HINT_T2);
          __m512i qv[R];
          for (int i = 0; i < R; ++i) qv[i] = _mm512_loadu_si512(q + i * p.k_padded + offset);
          for (int j = 0; j < C; ++j) {
            const __m512i wv = _mm512_xor_si512(_mm512_maskz_loadu_epi8(mask, w[j] + offset), sign_flip);
            for (int i = 0; i < R; ++i) acc[i * C + j] = _mm512_dpbusd_epi32(acc[i * C + j], wv, qv[i]);
          }
        };
        for (int64_t c = 0; c + 1 < chunks; ++c) accumulate(c * kW8A8KPad, ~__mmask64{0});
        accumulate((chunks - 1) * kW8A8KPad, tail_mask);
        // Lane i * C + j: row m + i, column n + j. Masked-off weight bytes load as 0 and flip to
        // 128, but meet zero padding in q, so the correction is 128 * q_sums alone.
        // The same fp32 operations as the portable kernel: float(sum) * (x_scale * w_scale) + residual.
        const __m512i q_sums = _mm512_permutexvar_epi32(row_of_lane, _mm512_maskz_loadu_epi32(tile_rows, p.q_sums + m));
        const __m512 x_scales = _mm512_permutexvar_ps(row_of_lane, _mm512_maskz_loadu_ps(tile_rows, p.x_scale + m));
        const __m512i total = _mm512_sub_epi32(sum_lanes_of_16(acc), _mm512_slli_epi32(q_sums, 7));
        const __m512 values = _mm512_mul_ps(_mm512_cvtepi32_ps(total), _mm512_mul_ps(x_scales, w_scales));
        const int rows_here = static_cast<int>(std::min<int64_t>(R, p.rows - m));
        for (int i = 0; i < rows_here; ++i) {
          // Lanes i * C .. i * C + columns - 1 go to row m + i from column n: a masked store from a
          // base i * C floats earlier (masked-off lanes are neither read nor written).
          const __mmask16 lanes = static_cast<__mmask16>(row_columns << (i * C));
          const int64_t first = (m + i) * p.out_features + n - i * C;
          __m512 row = values;
          if (p.residual)
            row = _mm512_add_ps(row, _mm512_maskz_loadu_ps(lanes, reinterpret_cast<const float*>(
                                         reinterpret_cast<intptr_t>(p.residual) + first * 4)));
          _mm512_mask_storeu_ps(reinterpret_cast<float*>(reinterpret_cast<intptr_t>(p.y) + first * 4), lanes, row);
        }
      }
    }
  }
}

}  // namespace

// One or two rows (decoding one sequence) would leave most of a 4-row tile empty: 1 x 16 tiles.
void w8a8_columns_vnni(const W8A8Problem& p, int64_t n_begin, int64_t n_end) {
  if (p.rows <= 2)
    columns_in_tiles<1, 16>(p, n_begin, n_end);
  else
    columns_in_tiles<4, 4>(p, n_begin, n_end);
}

}  // namespace umt5_fast
