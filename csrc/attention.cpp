// Fused attention: bias and masks become two additive vectors built once per call, then every
// (batch, head, block of query rows) streams over its keys with kernels::attention_block (fp32)
// or attention_block_bf16 (bf16).
#include "attention.h"

#include <algorithm>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "attention_amx.h"
#include "attention_bf16.h"
#include "bf16.h"
#include "bucket.h"
#include "kernels.h"
#include "ops.h"
#include "weight_types.h"

namespace py = pybind11;

namespace umt5_fast {
namespace {

// Additive term of every relative position, per head: entry (j - i + Lq - 1) holds the bias of
// (query i, key j), or kMaskedScore for a causally masked pair. One bucket (one log) per
// distance instead of one per (i, j). Heads share one row when there is no bias table.
struct PositionTerms {
  std::vector<float> values;
  int64_t head_stride = 0;  // 0 when all heads share the row
  // Each head's row reversed, with kAttentionMaxRows entries of padding on both sides: what
  // multi-row blocks read (one vector covers consecutive rows of one key).
  std::vector<float> reversed;
  int64_t reversed_head_stride = 0;
  int64_t distances = 0;

  PositionTerms(const AttentionProblem& p) {
    if (!p.bias_table && !p.causal) return;
    if (p.bias_table && !p.distance_buckets)
      throw std::invalid_argument("attention: a bias table needs its distance_buckets table");
    distances = p.query_length + p.key_length - 1;
    const int64_t rows = p.bias_table ? p.heads : 1;
    const int64_t row_length = distances + kernels::kPad;  // the kernel reads past the last key
    values.assign(rows * row_length, 0.0f);
    head_stride = p.bias_table ? row_length : 0;
    for (int64_t index = 0; index < distances; ++index) {
      const int64_t relative_position = index - (p.query_length - 1) - p.query_offset;
      if (p.causal && relative_position > 0) {
        for (int64_t h = 0; h < rows; ++h) values[h * row_length + index] = kMaskedScore;
      } else if (p.bias_table) {
        const int bucket = relative_position_bucket(relative_position, p.bidirectional, p.num_buckets,
                                                    p.max_distance, p.distance_buckets);
        for (int64_t h = 0; h < rows; ++h)
          values[h * row_length + index] = p.bias_table[bucket * p.heads + h];
      }
    }
    // One query row: the fp32 kernel's one-row blocks read values only.
    if (p.query_length == 1 && (p.element == AttentionElement::f32 || p.fp32_query_and_out)) return;
    reversed_head_stride = distances + 2 * kernels::kAttentionMaxRows;
    reversed.assign(rows * reversed_head_stride, 0.0f);
    for (int64_t h = 0; h < rows; ++h)
      for (int64_t index = 0; index < distances; ++index)
        reversed[h * reversed_head_stride + kernels::kAttentionMaxRows + distances - 1 - index] =
            values[h * row_length + index];
    if (!p.bias_table) reversed_head_stride = 0;
  }

  // The term of (query row `first_row`, key 0) for head h; row r of the kernel's block reads
  // relative to it.
  const float* for_block(int64_t h, int64_t first_row, int64_t query_length) const {
    if (values.empty()) return nullptr;
    return values.data() + h * head_stride + (query_length - 1 - first_row);
  }

  // The same for multi-row blocks: entry (r - j) holds the term of (row first_row + r, key j).
  const float* reversed_for_block(int64_t h, int64_t first_row, int64_t query_length) const {
    if (reversed.empty()) return nullptr;
    return reversed.data() + h * reversed_head_stride + kernels::kAttentionMaxRows + distances -
           query_length + first_row;
  }
};

// Per batch row: additive 0 / kMaskedScore per key, and the first and last kept key, outside
// which nothing is computed.
struct KeyTerms {
  std::vector<float> values;
  int64_t row_length = 0;
  std::vector<int64_t> first_kept, last_kept;

  KeyTerms(const AttentionProblem& p)
      : first_kept(p.batch, 0), last_kept(p.batch, p.key_length - 1) {
    if (!p.key_padding_mask) return;
    row_length = p.key_length + kernels::kPad;
    values.assign(p.batch * row_length, 0.0f);
    bool any_padded = false;
    for (int64_t b = 0; b < p.batch; ++b) {
      const uint8_t* keep = p.key_padding_mask + b * p.mask_batch_stride;
      first_kept[b] = p.key_length;
      last_kept[b] = -1;
      for (int64_t j = 0; j < p.key_length; ++j) {
        if (!keep[j]) {
          values[b * row_length + j] = kMaskedScore;
          any_padded = true;
        } else {
          first_kept[b] = std::min(first_kept[b], j);
          last_kept[b] = j;
        }
      }
    }
    if (!any_padded) values.clear();  // an all-ones mask: no per-score term to add
  }

  const float* for_batch(int64_t b) const {
    return values.empty() ? nullptr : values.data() + b * row_length;
  }
};

// Element pointer `offset` elements past base.
template <typename T>
T* element_at(const void* base, int64_t offset) {
  return const_cast<T*>(static_cast<const T*>(base)) + offset;
}

// The same for elements of a type known at run time.
const void* element_at(const void* base, int64_t offset, AttentionElement element) {
  return static_cast<const char*>(base) + offset * (element == AttentionElement::f32 ? 4 : 2);
}

// A row whose keys are all masked scores MASKED_SCORE everywhere: softmax is uniform, so the
// output is the mean of all Lk value rows (rare: a fully padded query under a causal mask). V: the
// values' element type; Out: float, or bf16 bits (rounded once).
template <typename V, typename Out>
void write_mean_of_values(const AttentionProblem& p, int64_t b, int64_t h, Out* out_row) {
  const V* v = element_at<V>(p.v, b * p.v_strides[0] + h * p.v_strides[1]);
  std::vector<float> sum(p.head_dim, 0.0f);
  for (int64_t j = 0; j < p.key_length; ++j)
    for (int d = 0; d < p.head_dim; ++d) sum[d] += widen_weight(v[j * p.v_strides[2] + d]);
  const float weight = 1.0f / static_cast<float>(p.key_length);
  for (int d = 0; d < p.head_dim; ++d) {
    if constexpr (std::is_same_v<Out, float>) out_row[d] = sum[d] * weight;
    else out_row[d] = float_to_bf16(sum[d] * weight);
  }
}

// bf16: every (batch, head)'s operands in the kernel's layout, packed once for all query blocks:
// V as key pairs (attention_bf16.h), or for the AMX kernel K rows and V^T (attention_amx.h).
struct Bf16Operands {
  std::vector<uint32_t> v_pairs;
  int64_t d_padded = 0, v_pairs_head_stride = 0;
  std::vector<uint16_t> k_rows, v_t;
  int64_t amx_dims = 0, amx_columns = 0, amx_head_stride = 0;

  Bf16Operands(const AttentionProblem& p, bool bf16_kernels, bool amx) {
    if (!bf16_kernels) return;
    if (amx) {
      amx_dims = amx_padded_dims(p.head_dim);
      amx_columns = p.key_length + kAmxKeyPad;
      amx_head_stride = amx_dims * amx_columns;
      k_rows.resize(p.batch * p.heads * amx_head_stride);
      v_t.resize(p.batch * p.heads * amx_head_stride);
    } else {
      d_padded = kernels::round_up(p.head_dim, 16);
      v_pairs_head_stride = (p.key_length + 1) / 2 * d_padded;
      v_pairs.resize(p.batch * p.heads * v_pairs_head_stride);
    }
    const int threads = static_cast<int>(std::clamp<int64_t>(p.batch * p.heads, 1, std::max(p.num_threads, 1)));
#pragma omp parallel for num_threads(threads)
    for (int64_t bh = 0; bh < p.batch * p.heads; ++bh) {
      const int64_t b = bh / p.heads, h = bh % p.heads;
      const uint16_t* v = element_at<uint16_t>(p.v, b * p.v_strides[0] + h * p.v_strides[1]);
      if (amx) {
        pack_keys_for_amx(element_at<uint16_t>(p.k, b * p.k_strides[0] + h * p.k_strides[1]),
                          p.k_strides[2], p.key_length, p.head_dim, k_rows.data() + bh * amx_head_stride);
        pack_values_for_amx(v, p.v_strides[2], p.key_length, p.head_dim, v_t.data() + bh * amx_head_stride);
      } else {
        pack_value_pairs(v, p.v_strides[2], p.key_length, p.head_dim, d_padded,
                         v_pairs.data() + bh * v_pairs_head_stride);
      }
    }
  }

  void set_for_head(int64_t b, int64_t h, int64_t heads, AttentionBlockBf16& block) const {
    block.v_pairs = v_pairs.data() + (b * heads + h) * v_pairs_head_stride;
    block.d_padded = d_padded;
  }

  void set_for_head(int64_t b, int64_t h, int64_t heads, AttentionBlockAmx& block) const {
    const int64_t offset = (b * heads + h) * amx_head_stride;
    block.k_rows = k_rows.data() + offset;
    block.k_row_stride = amx_dims;
    block.v_t = v_t.data() + offset;
    block.v_t_row_stride = amx_columns;
  }
};

// One operand of every (batch, head) with its `length` rows contiguous: [B, H, length, D], as T
// (bf16 bits or Fp16 widened exactly when T is float and From is one of them).
template <typename T, typename From = T>
std::vector<T> rows_by_head(const AttentionProblem& p, const void* base, const std::array<int64_t, 3>& strides,
                            int64_t length) {
  const int64_t head_stride = length * p.head_dim;
  std::vector<T> rows(p.batch * p.heads * head_stride);
  const int threads = static_cast<int>(std::clamp<int64_t>(p.batch * p.heads, 1, std::max(p.num_threads, 1)));
#pragma omp parallel for num_threads(threads)
  for (int64_t bh = 0; bh < p.batch * p.heads; ++bh) {
    const From* head = element_at<From>(base, bh / p.heads * strides[0] + bh % p.heads * strides[1]);
    for (int64_t j = 0; j < length; ++j) {
      T* row = rows.data() + bh * head_stride + j * p.head_dim;
      if constexpr (std::is_same_v<T, From>) std::copy_n(head + j * strides[2], p.head_dim, row);
      else run_convert(head + j * strides[2], row, p.head_dim);
    }
  }
  return rows;
}

// The keys (and values) the fp32 and vdpbf16ps kernels read, with each head's rows contiguous,
// copied once per call where several query blocks read every key and the caller's rows are not
// contiguous: in the model's [B, L, H, D] layout one head's rows lie H * D apart, and every block
// streamed them interleaved with the other heads' rows, which the hardware prefetchers fetch too.
// 1 x 4096 tokens, 6 heads of 64, per layer: fp32 268 -> 198 ms under AVX2 and 172 -> 138 ms with
// AVX-512, bf16 212 -> 188 ms (the copies take ~1 ms). (bf16 V is packed into pairs anyway, and
// the AMX kernel packs its own operands.) Half-precision K/V for the fp32 kernel are widened into
// such copies whenever several blocks read them, rather than a tile at a time in every block.
struct ContiguousOperands {
  std::vector<float> k, v;
  std::vector<uint16_t> k_bf16;
  int64_t head_stride = 0;

  ContiguousOperands(const AttentionProblem& p, int64_t blocks_per_head, bool bf16_kernels, bool amx) {
    const bool k_strided = p.k_strides[2] != p.head_dim, v_strided = p.v_strides[2] != p.head_dim;
    if (amx || blocks_per_head < 2) return;
    head_stride = p.key_length * p.head_dim;
    if (bf16_kernels) {
      if (k_strided) k_bf16 = rows_by_head<uint16_t>(p, p.k, p.k_strides, p.key_length);
    } else if (p.element == AttentionElement::bf16) {
      k = rows_by_head<float, uint16_t>(p, p.k, p.k_strides, p.key_length);
      v = rows_by_head<float, uint16_t>(p, p.v, p.v_strides, p.key_length);
    } else if (p.element == AttentionElement::f16) {
      k = rows_by_head<float, Fp16>(p, p.k, p.k_strides, p.key_length);
      v = rows_by_head<float, Fp16>(p, p.v, p.v_strides, p.key_length);
    } else if (k_strided || v_strided) {
      k = rows_by_head<float>(p, p.k, p.k_strides, p.key_length);
      v = rows_by_head<float>(p, p.v, p.v_strides, p.key_length);
    }
  }

  // Element of the K and V the fp32 kernel reads.
  AttentionElement kv_element(const AttentionProblem& p) const { return k.empty() ? p.element : AttentionElement::f32; }

  // The block's K and V: the copies' rows of (b, h) where there are copies, else the caller's
  // (half-precision ones widened by the kernel).
  void set_for_head(const AttentionProblem& p, int64_t b, int64_t h, kernels::AttentionBlock& block) const {
    block.kv_element = kv_element(p);
    if (k.empty()) {
      block.v = element_at(p.v, b * p.v_strides[0] + h * p.v_strides[1], p.element);
      block.v_row_stride = p.v_strides[2];
      return;
    }
    block.k = k.data() + (b * p.heads + h) * head_stride;
    block.v = v.data() + (b * p.heads + h) * head_stride;
    block.k_row_stride = block.v_row_stride = p.head_dim;
  }
  void set_for_head(const AttentionProblem& p, int64_t b, int64_t h, AttentionBlockBf16& block) const {
    if (k_bf16.empty()) return;
    block.k = k_bf16.data() + (b * p.heads + h) * head_stride;
    block.k_row_stride = p.head_dim;
  }
};

// The kernel's block: query rows [first_row, first_row + num_rows) of (b, h), with the keys
// and terms they see.
template <class Block, typename T>
void fill_block(const AttentionProblem& p, const PositionTerms& position_terms,
                const KeyTerms& key_terms, int64_t b, int64_t h, int64_t first_row, int num_rows,
                Block& block) {
  const int64_t out_row_stride = p.heads * p.head_dim;
  block.q = element_at<T>(p.q, b * p.q_strides[0] + h * p.q_strides[1] + first_row * p.q_strides[2]);
  block.q_row_stride = p.q_strides[2];
  // (K and V hold p.element, also where q and out are fp32)
  block.k = static_cast<decltype(block.k)>(element_at(p.k, b * p.k_strides[0] + h * p.k_strides[1], p.element));
  block.k_row_stride = p.k_strides[2];
  block.out = element_at<T>(p.out, (b * p.query_length + first_row) * out_row_stride + h * p.head_dim);
  block.out_row_stride = out_row_stride;
  block.num_rows = num_rows;
  block.head_dim = p.head_dim;
  block.scale = p.scale;
  block.key_begin = key_terms.first_kept[b];
  block.key_end = key_terms.last_kept[b] + 1;
  if (p.causal) block.key_end = std::min(block.key_end, first_row + num_rows + p.query_offset);
  block.position_term_reversed = position_terms.reversed_for_block(h, first_row, p.query_length);
  block.key_term = key_terms.for_batch(b);
}

// bf16 attention where the bf16 kernels cannot run, and fp16 attention (Half: uint16_t holding
// bf16 bits, or Fp16): q widened (exactly) into an fp32 copy, the fp32 kernel reading K and V as
// they are (widened as they are loaded for one query row, a key tile at a time for one block of
// several rows, or once into fp32 copies, O(Lk * D), where several query blocks read them), its
// output rounded once: the bits of the fp32 kernel on widened copies of q, k and v. A decode step
// (one query row) so reads its half-precision cache and encoder K/V without copies.
template <typename Half>
void run_widened_half_attention(const AttentionProblem& p) {
  const std::vector<float> q = rows_by_head<float, Half>(p, p.q, p.q_strides, p.query_length);
  std::vector<float> out(p.batch * p.query_length * p.heads * p.head_dim);
  AttentionProblem widened = p;
  widened.q = q.data();
  widened.q_strides = {p.heads * p.query_length * p.head_dim, p.query_length * p.head_dim, p.head_dim};
  widened.out = out.data();
  widened.fp32_query_and_out = true;
  run_attention(widened);
  run_convert(out.data(), static_cast<Half*>(p.out), static_cast<int64_t>(out.size()));
}

}  // namespace

bool cpu_supports_bf16_attention() {
  return cpu_isa() == CpuIsa::avx512 && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bf16");
}

void run_attention(const AttentionProblem& p) {
  const bool half = p.element != AttentionElement::f32 && !p.fp32_query_and_out;
  const bool bf16 = half && p.element == AttentionElement::bf16 && cpu_supports_bf16_attention();
  if (half && !bf16) {
    if (p.element == AttentionElement::bf16) return run_widened_half_attention<uint16_t>(p);
    return run_widened_half_attention<Fp16>(p);
  }
  const PositionTerms position_terms(p);
  const KeyTerms key_terms(p);
  const bool amx = bf16 && p.query_length >= kAmxMinRows && amx_attention_enabled();
  const Bf16Operands bf16_operands(p, bf16, amx);
  const int64_t blocks_per_head =
      (p.query_length + kernels::kAttentionMaxRows - 1) / kernels::kAttentionMaxRows;
  const ContiguousOperands contiguous(p, blocks_per_head, bf16, amx);
  // Even split: 33 rows make blocks of 17 and 16, not 32 and 1.
  const int64_t rows_per_block = (p.query_length + blocks_per_head - 1) / blocks_per_head;
  const int64_t tasks = p.batch * p.heads * blocks_per_head;
  const int64_t out_row_stride = p.heads * p.head_dim;
  const int threads = static_cast<int>(std::clamp<int64_t>(tasks, 1, std::max(p.num_threads, 1)));
  void (*attend)(const kernels::AttentionBlock&, float*) = nullptr;
  UMT5_DISPATCH_ISA(ISA, attend = &kernels::attention_block<ISA>);

#pragma omp parallel num_threads(threads)
  {
    std::vector<float> scratch(amx    ? attention_amx_scratch_floats(p.head_dim)
                               : bf16 ? attention_bf16_scratch_floats(p.head_dim)
                                      : kernels::attention_scratch_floats(p.head_dim, contiguous.kv_element(p), p.query_length));
    // Causal blocks differ in work: hand them out dynamically.
#pragma omp for schedule(dynamic)
    for (int64_t task = 0; task < tasks; ++task) {
      const int64_t b = task / (p.heads * blocks_per_head);
      const int64_t h = task / blocks_per_head % p.heads;
      const int64_t first_row = task % blocks_per_head * rows_per_block;
      const int num_rows = static_cast<int>(std::min(rows_per_block, p.query_length - first_row));

      if (amx) {
        AttentionBlockAmx block;
        fill_block<AttentionBlockBf16, uint16_t>(p, position_terms, key_terms, b, h, first_row,
                                                 num_rows, block.rows);
        bf16_operands.set_for_head(b, h, p.heads, block);
        if (block.rows.key_begin < block.rows.key_end) attention_block_amx(block, scratch.data());
      } else if (bf16) {
        AttentionBlockBf16 block;
        fill_block<AttentionBlockBf16, uint16_t>(p, position_terms, key_terms, b, h, first_row,
                                                 num_rows, block);
        bf16_operands.set_for_head(b, h, p.heads, block);
        contiguous.set_for_head(p, b, h, block);
        if (block.key_begin < block.key_end) attention_block_bf16(block, scratch.data());
      } else {
        kernels::AttentionBlock block;
        fill_block<kernels::AttentionBlock, float>(p, position_terms, key_terms, b, h, first_row,
                                                   num_rows, block);
        contiguous.set_for_head(p, b, h, block);
        block.position_term = position_terms.for_block(h, first_row, p.query_length);
        if (block.key_begin < block.key_end) attend(block, scratch.data());
      }

      for (int r = 0; r < num_rows; ++r) {
        int64_t last_unmasked = key_terms.last_kept[b];
        if (p.causal) last_unmasked = std::min(last_unmasked, first_row + r + p.query_offset);
        if (last_unmasked >= key_terms.first_kept[b]) continue;
        const int64_t out_row = (b * p.query_length + first_row + r) * out_row_stride + h * p.head_dim;
        if (bf16)
          write_mean_of_values<uint16_t>(p, b, h, element_at<uint16_t>(p.out, out_row));
        else if (p.element == AttentionElement::bf16)
          write_mean_of_values<uint16_t>(p, b, h, element_at<float>(p.out, out_row));
        else if (p.element == AttentionElement::f16)
          write_mean_of_values<Fp16>(p, b, h, element_at<float>(p.out, out_row));
        else
          write_mean_of_values<float>(p, b, h, element_at<float>(p.out, out_row));
      }
    }
  }
}

void register_attention(py::module_& m) {
  m.def("attention",
        [](uintptr_t q, std::array<int64_t, 3> q_strides, uintptr_t k,
           std::array<int64_t, 3> k_strides, uintptr_t v, std::array<int64_t, 3> v_strides,
           uintptr_t out, int64_t batch, int64_t heads, int64_t query_length, int64_t key_length,
           int head_dim, uintptr_t bias_table, uintptr_t distance_buckets, int num_buckets, int max_distance,
           bool bidirectional, uintptr_t key_padding_mask, int64_t mask_batch_stride, bool causal,
           int64_t query_offset, float scale, int num_threads, const std::string& element) {
          if (element != "float32" && element != "bfloat16" && element != "float16")
            throw std::invalid_argument("attention: element must be 'float32', 'bfloat16' or 'float16', got '" +
                                        element + "'");
          AttentionProblem problem{
              reinterpret_cast<const void*>(q), q_strides,
              reinterpret_cast<const void*>(k), k_strides,
              reinterpret_cast<const void*>(v), v_strides,
              reinterpret_cast<void*>(out), batch, heads, query_length, key_length, head_dim,
              reinterpret_cast<const float*>(bias_table), reinterpret_cast<const int32_t*>(distance_buckets),
              num_buckets, max_distance, bidirectional, reinterpret_cast<const uint8_t*>(key_padding_mask),
              mask_batch_stride, causal, query_offset, scale, num_threads,
              element == "bfloat16"  ? AttentionElement::bf16
              : element == "float16" ? AttentionElement::f16
                                     : AttentionElement::f32};
          py::gil_scoped_release no_gil;
          run_attention(problem);
        },
        py::kw_only(), py::arg("q"), py::arg("q_strides"), py::arg("k"), py::arg("k_strides"),
        py::arg("v"), py::arg("v_strides"), py::arg("out"), py::arg("batch"), py::arg("heads"),
        py::arg("query_length"), py::arg("key_length"), py::arg("head_dim"),
        py::arg("bias_table"), py::arg("distance_buckets"), py::arg("num_buckets"), py::arg("max_distance"),
        py::arg("bidirectional"), py::arg("key_padding_mask"), py::arg("mask_batch_stride"),
        py::arg("causal"), py::arg("query_offset"), py::arg("scale"), py::arg("num_threads"),
        py::arg("element") = "float32",
        "Fused attention on data pointers (q, k, v, out of `element`: 'float32', 'bfloat16' or "
        "'float16'; validated by "
        "umt5_fast.ops.cpu.attention). Null pointers (0) mean no bias table / no padding mask; "
        "distance_buckets: umt5_fast.buckets.distance_buckets, with a bias table.");
  m.def("has_bf16_attention", &cpu_supports_bf16_attention,
        "Whether bf16 attention runs on bf16 products here (AVX512-BF16 and the avx512 ISA "
        "selected); elsewhere it runs the fp32 kernel, which reads the bf16 K/V as they are.");
  m.def("has_amx_attention", &cpu_supports_amx_attention,
        "Whether bf16 attention can run on AMX tiles here (AMX-BF16, granted by the OS).");
  m.def("amx_attention_enabled", &amx_attention_enabled,
        "Whether bf16 attention of 16+ query rows runs on AMX tiles (default: where it can).");
  m.def("enable_amx_attention", &enable_amx_attention, py::arg("enabled"),
        "Turns the AMX bf16 attention kernel on or off (tests run both kernels); ValueError when "
        "turned on without has_amx_attention().");
}

}  // namespace umt5_fast
