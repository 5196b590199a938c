// AVX2 kernels of w8a8_linear (see w8a8_linear.h), the activation quantiser and the integer GEMM,
// for CPUs without AVX512-VNNI; the only W8A8 translation unit built with -mavx2, called only when
// the selected ISA is avx2 or avx512.
//
// AVX2 has no vpdpbusd. Its byte product vpmaddubsw multiplies unsigned by signed bytes and adds
// adjacent pairs into int16 *with saturation*, so the VNNI kernel's w + 128 offset (up to
// 2 * 255 * 127) would clip. The sign trick avoids that: |w| (unsigned, <= 128) times q * sign(w)
// (signed, |q| <= 127) gives the same products, and a pair of them stays within
// 2 * 128 * 127 = 32512 < 32767, so every sum is exact. vpmaddwd against ones then adds the two
// pairs of each 32-bit lane: lane j of an accumulator holds column j's sum over 4 bytes of K, as in
// the column-block layout, and no horizontal sums are needed (the row layout's kernel,
// rows_in_tiles, sums whole vectors of one weight row and reduces them once at the end). The fp32
// epilogue is the portable kernel's, so the results are identical bit for bit.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "w8a8_linear.h"

namespace umt5_fast {
namespace {

constexpr int kGroupBytes = 4 * kW8A8BlockColumns;  // one 4-byte group of K for 16 columns

// A tile is R activation rows x C weight blocks; each block is two 256-bit halves of 8 columns.
template <int R, int C>
void blocks_in_tiles(const W8A8Problem& p, int64_t block_begin, int64_t block_end) {
  const int64_t K = p.in_features, groups = K / 4, block_bytes = kW8A8BlockColumns * K;
  const int tail = static_cast<int>(K % 4);
  const __m256i ones = _mm256_set1_epi16(1);
  const int64_t row_block = w8a8_tiles::row_block(p.k_padded);

  for (int64_t m0 = 0; m0 < p.rows; m0 += row_block) {
    const int64_t m_end = std::min(p.rows, m0 + row_block);
    for (int64_t b = block_begin; b < block_end; b += C) {
      const int blocks_here = static_cast<int>(std::min<int64_t>(C, block_end - b));
      const int8_t* w[C];  // a partial tile repeats its last block, whose sums are not stored
      for (int c = 0; c < C; ++c) w[c] = p.w + (b + std::min(c, blocks_here - 1)) * block_bytes;
      alignas(32) int8_t tail_w[C][kGroupBytes] = {};  // the K % 4 last entries of each column
      for (int c = 0; c < C; ++c) w8a8_tiles::gather_tail(w[c], groups, tail, tail_w[c]);

      for (int64_t m = m0; m < m_end; m += R) {  // rows past p.rows: zero padding of q
        const int8_t* q = p.q + m * p.k_padded;
        __m256i acc[R][2 * C];
        for (auto& row : acc)
          for (auto& a : row) a = _mm256_setzero_si256();
        // Adds 4 bytes of K (from q's byte `at` on) times one 64-byte group of each block.
        const auto accumulate = [&](const int8_t* const* group, int64_t at) __attribute__((always_inline)) {
          __m256i weights[2 * C], magnitudes[2 * C];
          for (int h = 0; h < 2 * C; ++h) {
            weights[h] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(group[h / 2] + 32 * (h % 2)));
            magnitudes[h] = _mm256_sign_epi8(weights[h], weights[h]);  // |w|; -128 stays 0x80 = 128
          }
          for (int i = 0; i < R; ++i) {
            int32_t four;  // q[m + i][at .. at + 3]
            std::memcpy(&four, q + i * p.k_padded + at, sizeof(four));
            const __m256i broadcast = _mm256_set1_epi32(four);
            for (int h = 0; h < 2 * C; ++h) {
              const __m256i pairs = _mm256_maddubs_epi16(magnitudes[h], _mm256_sign_epi8(broadcast, weights[h]));
              acc[i][h] = _mm256_add_epi32(acc[i][h], _mm256_madd_epi16(pairs, ones));
            }
          }
        };
        const int8_t* group[C];
        for (int64_t g = 0; g < groups; ++g) {
          for (int c = 0; c < C; ++c) group[c] = w[c] + g * kGroupBytes;
          accumulate(group, 4 * g);
        }
        if (tail) {
          for (int c = 0; c < C; ++c) group[c] = tail_w[c];
          accumulate(group, 4 * groups);
        }

        // The same fp32 operations as the portable kernel: float(sum) * (x_scale * w_scale) + residual.
        const int rows_here = static_cast<int>(std::min<int64_t>(R, p.rows - m));
        for (int i = 0; i < rows_here; ++i) {
          const __m256 x_scale = _mm256_set1_ps(p.x_scale[m + i]);
          for (int h = 0; h < 2 * blocks_here; ++h) {
            const int64_t n0 = (b + h / 2) * kW8A8BlockColumns + 8 * (h % 2);
            const int columns = static_cast<int>(std::clamp<int64_t>(p.out_features - n0, 0, 8));
            if (columns == 0) continue;
            const int64_t at = (m + i) * p.out_features + n0;
            alignas(32) float w_scale[8] = {}, residual[8] = {}, out[8];
            std::memcpy(w_scale, p.w_scale + n0, columns * sizeof(float));
            __m256 values = _mm256_mul_ps(_mm256_cvtepi32_ps(acc[i][h]),
                                          _mm256_mul_ps(x_scale, _mm256_load_ps(w_scale)));
            if (p.residual) {
              std::memcpy(residual, p.residual + at, columns * sizeof(float));
              values = _mm256_add_ps(values, _mm256_load_ps(residual));
            }
            _mm256_store_ps(out, values);
            std::memcpy(p.y + at, out, columns * sizeof(float));
          }
        }
      }
    }
  }
}

// The row layout (w8a8_linear.h): each weight row's K bytes in 32-byte vectors with the same sign
// trick, lane-wise sums per (activation row, weight row) pair, reduced across lanes at the end of
// K. Lane j of the result is the sum of the eight lanes of a[j]:
inline __m256i lane_sums_of_eight(const __m256i (&a)[8]) {
  // per 128-bit half: [a0 + a1, a2 + a3, b0 + b1, b2 + b3] of pairs, then the half's sums of four
  const __m256i low = _mm256_hadd_epi32(_mm256_hadd_epi32(a[0], a[1]), _mm256_hadd_epi32(a[2], a[3]));
  const __m256i high = _mm256_hadd_epi32(_mm256_hadd_epi32(a[4], a[5]), _mm256_hadd_epi32(a[6], a[7]));
  return _mm256_add_epi32(_mm256_permute2x128_si256(low, high, 0x20), _mm256_permute2x128_si256(low, high, 0x31));
}

// Lanes [0, n) of a vector of 8 (vmaskmovps: the others are neither read nor written).
inline __m256i first_lanes(int n) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

// A tile is R activation rows x C weight rows, R * C = 8 sums: one vector after the reduction,
// lane i * C + c for (row m + i, weight row n0 + c). Activation rows past p.rows are q's zero
// padding and are not stored; weight rows past row_end repeat the last one, not stored.
template <int R, int C>
void rows_in_tiles(const W8A8Problem& p, int64_t row_begin, int64_t row_end) {
  static_assert(R * C == 8 && (R == 1 || R == 2), "one vector of sums per tile, one or two rows");
  const int64_t K = p.in_features, full = K / 32 * 32;
  const __m256i ones = _mm256_set1_epi16(1);
  const int64_t row_block = w8a8_tiles::row_block(p.k_padded);
  for (int64_t m0 = 0; m0 < p.rows; m0 += row_block) {
    const int64_t m_end = std::min(p.rows, m0 + row_block);
    for (int64_t n0 = row_begin; n0 < row_end; n0 += C) {
      const int8_t* w[C];
      alignas(32) int8_t tail_w[C][32] = {};  // the K % 32 last bytes of each row, zero padded
      for (int c = 0; c < C; ++c) {
        w[c] = p.w + std::min(n0 + c, row_end - 1) * K;
        std::memcpy(tail_w[c], w[c] + full, K - full);
      }
      const int columns = static_cast<int>(std::min<int64_t>(C, row_end - n0));
      const __m256i column_lanes = first_lanes(columns);  // of each row's C lanes
      // w_scale[n0 + c] in lane i * C + c
      const __m256 w_scale = R == 1 ? _mm256_maskload_ps(p.w_scale + n0, column_lanes) : [&] {
        const __m128 row = _mm_maskload_ps(p.w_scale + n0, _mm256_castsi256_si128(column_lanes));
        return _mm256_insertf128_ps(_mm256_castps128_ps256(row), row, 1);
      }();
      for (int64_t m = m0; m < m_end; m += R) {
        __m256i acc[R * C];
        for (auto& a : acc) a = _mm256_setzero_si256();
        // Adds 32 bytes of K (from byte `at` of q on) times the weight vectors weight(c).
        const auto accumulate = [&](int64_t at, auto weight) __attribute__((always_inline)) {
          __m256i q[R];
          for (int i = 0; i < R; ++i)
            q[i] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p.q + (m + i) * p.k_padded + at));
          for (int c = 0; c < C; ++c) {
            const __m256i wv = weight(c);
            const __m256i magnitude = _mm256_sign_epi8(wv, wv);
            for (int i = 0; i < R; ++i) {
              const __m256i pairs = _mm256_maddubs_epi16(magnitude, _mm256_sign_epi8(q[i], wv));
              acc[i * C + c] = _mm256_add_epi32(acc[i * C + c], _mm256_madd_epi16(pairs, ones));
            }
          }
        };
        // The next tile's rows (contiguous), a slice per step into L2: each tile's C short
        // interleaved streams leave the hardware prefetcher behind. The first row tile fetches.
        const char* next_tile = m == m0 && n0 + 2 * C <= row_end ? reinterpret_cast<const char*>(w[0] + C * K) : nullptr;
        for (int64_t k = 0; k < full; k += 32) {
          if (next_tile)
            for (int line = 0; line < C * 32; line += 64) __builtin_prefetch(next_tile + C * k + line, 0, 1);
          accumulate(k, [&](int c) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w[c] + k)); });
        }
        if (full < K)  // q is zero padded to a multiple of 64 bytes
          accumulate(full, [&](int c) { return _mm256_load_si256(reinterpret_cast<const __m256i*>(tail_w[c])); });

        // The portable kernel's fp32 operations, eight at a time: float(sum) * (x_scale * w_scale)
        // + residual. Rows past p.rows read q's padding.
        const __m256 x_scale = R == 1 ? _mm256_set1_ps(p.x_scale[m])
                                      : _mm256_setr_m128(_mm_set1_ps(p.x_scale[m]), _mm_set1_ps(p.x_scale[m + 1]));
        const __m256 values = _mm256_mul_ps(_mm256_cvtepi32_ps(lane_sums_of_eight(acc)),
                                            _mm256_mul_ps(x_scale, w_scale));
        const int64_t at = m * p.out_features + n0;
        if constexpr (R == 1) {
          _mm256_maskstore_ps(p.y + at, column_lanes, p.residual ? _mm256_add_ps(values,
              _mm256_maskload_ps(p.residual + at, column_lanes)) : values);
          continue;
        }
        const __m128i row_lanes = _mm256_castsi256_si128(column_lanes);
        const int rows_here = static_cast<int>(std::min<int64_t>(R, p.rows - m));
        for (int i = 0; i < rows_here; ++i) {
          const __m128 row = i == 0 ? _mm256_castps256_ps128(values) : _mm256_extractf128_ps(values, 1);
          const int64_t row_at = at + i * p.out_features;
          _mm_maskstore_ps(p.y + row_at, row_lanes, p.residual ? _mm_add_ps(row,
              _mm_maskload_ps(p.residual + row_at, row_lanes)) : row);
        }
      }
    }
  }
}

}  // namespace

// w8a8_quantise_row_portable eight lanes at a time: the same products and clamps, rounding to
// nearest even by vroundps where the portable one adds and subtracts 1.5 * 2^23 (equal for
// |v| <= 127). The last k % 8 entries go through the same vector code from a zero-padded copy
// (zeros change neither the maximum nor the sum).
void w8a8_quantise_row_avx2(const float* row, int64_t k, int8_t* q, int32_t* sum, float* scale) {
  const int64_t full = k / 8 * 8;
  alignas(32) float tail[8] = {};
  std::memcpy(tail, row + full, (k - full) * sizeof(float));
  const auto load = [&](int64_t i) { return i < full ? _mm256_loadu_ps(row + i) : _mm256_load_ps(tail); };
  const __m256 no_sign = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  __m256 amax = _mm256_setzero_ps(), non_finite = _mm256_setzero_ps();
  for (int64_t i = 0; i < k; i += 8) {
    const __m256 magnitude = _mm256_and_ps(load(i), no_sign);
    non_finite = _mm256_or_ps(non_finite, _mm256_cmp_ps(magnitude, _mm256_set1_ps(3.4028235e38f), _CMP_NLE_UQ));
    amax = _mm256_max_ps(amax, magnitude);
  }
  if (_mm256_movemask_ps(non_finite)) {
    *scale = NAN;  // NaN outputs, as the eager reference gives
    return;
  }
  __m128 folded = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
  folded = _mm_max_ps(folded, _mm_movehl_ps(folded, folded));
  const float row_max = _mm_cvtss_f32(_mm_max_ss(folded, _mm_movehdup_ps(folded)));
  if (row_max == 0.0f) return;
  const __m256 inverse = _mm256_set1_ps(w8a8_inverse_scale(row_max));
  *scale = w8a8_row_scale(row_max);
  __m256i total = _mm256_setzero_si256();
  for (int64_t i = 0; i < k; i += 8) {
    __m256 v = _mm256_mul_ps(load(i), inverse);
    v = _mm256_min_ps(_mm256_max_ps(v, _mm256_set1_ps(-127.0f)), _mm256_set1_ps(127.0f));
    const __m256i values = _mm256_cvtps_epi32(_mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    total = _mm256_add_epi32(total, values);
    // int32 -> int8 (no saturation: |values| <= 127): four bytes from each 128-bit half
    const __m256i words = _mm256_packs_epi32(values, values);
    const __m256i bytes = _mm256_packs_epi16(words, words);
    const int32_t low = _mm_cvtsi128_si32(_mm256_castsi256_si128(bytes));
    const int32_t high = _mm_cvtsi128_si32(_mm256_extracti128_si256(bytes, 1));
    const int64_t lanes = std::min<int64_t>(8, k - i);
    std::memcpy(q + i, &low, std::min<int64_t>(4, lanes));
    if (lanes > 4) std::memcpy(q + i + 4, &high, lanes - 4);
  }
  __m128i sums = _mm_add_epi32(_mm256_castsi256_si128(total), _mm256_extracti128_si256(total, 1));
  sums = _mm_add_epi32(sums, _mm_shuffle_epi32(sums, 0x4E));
  sums = _mm_add_epi32(sums, _mm_shuffle_epi32(sums, 0xB1));
  *sum = _mm_cvtsi128_si32(sums);
}

// One row (decoding one sequence) streams the weights: four blocks (eight accumulators) keep
// independent sums in flight. More rows reuse each weight vector R times. Only <4, 1> keeps its
// accumulators, weights and magnitudes within the sixteen ymm registers; the others spill some,
// yet shapes with fewer live registers (<1, 2>, <2, 1>) measured the same within noise: the
// integer multiplies bound this kernel (~10 multiply-adds a cycle per core on a Zen 3).
void w8a8_blocks_avx2(const W8A8Problem& p, int64_t block_begin, int64_t block_end) {
  if (p.rows == 1)
    blocks_in_tiles<1, 4>(p, block_begin, block_end);
  else if (p.rows == 2)
    blocks_in_tiles<2, 2>(p, block_begin, block_end);
  else
    blocks_in_tiles<4, 1>(p, block_begin, block_end);
}

// One activation row streams the weight rows eight at a time; more rows reuse each weight vector
// (and its magnitude) twice and each activation vector four times, within the 16 registers.
void w8a8_rows_avx2(const W8A8Problem& p, int64_t row_begin, int64_t row_end) {
  if (p.rows == 1)
    rows_in_tiles<1, 8>(p, row_begin, row_end);
  else
    rows_in_tiles<2, 4>(p, row_begin, row_end);
}

}  // namespace umt5_fast
