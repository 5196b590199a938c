// Fused attention: bias and masks become two additive vectors built once per call, then every
// (batch, head, block of query rows) streams over its keys with kernels::attention_block.
#include "attention.h"

#include <algorithm>
#include <vector>

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "bucket.h"
#include "kernels.h"

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
        const int bucket = relative_position_bucket(relative_position, p.bidirectional,
                                                    p.num_buckets, p.max_distance);
        for (int64_t h = 0; h < rows; ++h)
          values[h * row_length + index] = p.bias_table[bucket * p.heads + h];
      }
    }
    if (p.query_length == 1) return;  // one-row blocks only
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

// A row whose keys are all masked scores MASKED_SCORE everywhere: softmax is uniform, so the
// output is the mean of all Lk value rows (rare: a fully padded query under a causal mask).
void write_mean_of_values(const AttentionProblem& p, int64_t b, int64_t h, float* out_row) {
  const float* v = p.v + b * p.v_strides[0] + h * p.v_strides[1];
  std::fill(out_row, out_row + p.head_dim, 0.0f);
  for (int64_t j = 0; j < p.key_length; ++j)
    for (int d = 0; d < p.head_dim; ++d) out_row[d] += v[j * p.v_strides[2] + d];
  const float weight = 1.0f / static_cast<float>(p.key_length);
  for (int d = 0; d < p.head_dim; ++d) out_row[d] *= weight;
}

}  // namespace

void run_attention(const AttentionProblem& p) {
  const PositionTerms position_terms(p);
  const KeyTerms key_terms(p);
  const int64_t blocks_per_head =
      (p.query_length + kernels::kAttentionMaxRows - 1) / kernels::kAttentionMaxRows;
  // Even split: 33 rows make blocks of 17 and 16, not 32 and 1.
  const int64_t rows_per_block = (p.query_length + blocks_per_head - 1) / blocks_per_head;
  const int64_t tasks = p.batch * p.heads * blocks_per_head;
  const int64_t out_row_stride = p.heads * p.head_dim;
  const int threads = static_cast<int>(std::clamp<int64_t>(tasks, 1, std::max(p.num_threads, 1)));
  void (*attend)(const kernels::AttentionBlock&, float*) = nullptr;
  UMT5_DISPATCH_ISA(ISA, attend = &kernels::attention_block<ISA>);

#pragma omp parallel num_threads(threads)
  {
    std::vector<float> scratch(kernels::attention_scratch_floats(p.head_dim));
    // Causal blocks differ in work: hand them out dynamically.
#pragma omp for schedule(dynamic)
    for (int64_t task = 0; task < tasks; ++task) {
      const int64_t b = task / (p.heads * blocks_per_head);
      const int64_t h = task / blocks_per_head % p.heads;
      const int64_t first_row = task % blocks_per_head * rows_per_block;
      const int num_rows = static_cast<int>(std::min(rows_per_block, p.query_length - first_row));
      const int64_t last_position = first_row + num_rows - 1 + p.query_offset;

      kernels::AttentionBlock block;
      block.q = p.q + b * p.q_strides[0] + h * p.q_strides[1] + first_row * p.q_strides[2];
      block.q_row_stride = p.q_strides[2];
      block.k = p.k + b * p.k_strides[0] + h * p.k_strides[1];
      block.k_row_stride = p.k_strides[2];
      block.v = p.v + b * p.v_strides[0] + h * p.v_strides[1];
      block.v_row_stride = p.v_strides[2];
      block.out = p.out + (b * p.query_length + first_row) * out_row_stride + h * p.head_dim;
      block.out_row_stride = out_row_stride;
      block.num_rows = num_rows;
      block.head_dim = p.head_dim;
      block.scale = p.scale;
      block.key_begin = key_terms.first_kept[b];
      block.key_end = key_terms.last_kept[b] + 1;
      if (p.causal) block.key_end = std::min(block.key_end, last_position + 1);
      block.position_term = position_terms.for_block(h, first_row, p.query_length);
      block.position_term_reversed = position_terms.reversed_for_block(h, first_row, p.query_length);
      block.key_term = key_terms.for_batch(b);
      if (block.key_begin < block.key_end) attend(block, scratch.data());

      for (int r = 0; r < num_rows; ++r) {
        int64_t last_unmasked = key_terms.last_kept[b];
        if (p.causal) last_unmasked = std::min(last_unmasked, first_row + r + p.query_offset);
        if (last_unmasked < key_terms.first_kept[b])
          write_mean_of_values(p, b, h, block.out + r * out_row_stride);
      }
    }
  }
}

void register_attention(py::module_& m) {
  m.def("attention",
        [](uintptr_t q, std::array<int64_t, 3> q_strides, uintptr_t k,
           std::array<int64_t, 3> k_strides, uintptr_t v, std::array<int64_t, 3> v_strides,
           uintptr_t out, int64_t batch, int64_t heads, int64_t query_length, int64_t key_length,
           int head_dim, uintptr_t bias_table, int num_buckets, int max_distance,
           bool bidirectional, uintptr_t key_padding_mask, int64_t mask_batch_stride, bool causal,
           int64_t query_offset, float scale, int num_threads) {
          AttentionProblem problem{
              reinterpret_cast<const float*>(q), q_strides,
              reinterpret_cast<const float*>(k), k_strides,
              reinterpret_cast<const float*>(v), v_strides,
              reinterpret_cast<float*>(out), batch, heads, query_length, key_length, head_dim,
              reinterpret_cast<const float*>(bias_table), num_buckets, max_distance,
              bidirectional, reinterpret_cast<const uint8_t*>(key_padding_mask),
              mask_batch_stride, causal, query_offset, scale, num_threads};
          py::gil_scoped_release no_gil;
          run_attention(problem);
        },
        py::kw_only(), py::arg("q"), py::arg("q_strides"), py::arg("k"), py::arg("k_strides"),
        py::arg("v"), py::arg("v_strides"), py::arg("out"), py::arg("batch"), py::arg("heads"),
        py::arg("query_length"), py::arg("key_length"), py::arg("head_dim"),
        py::arg("bias_table"), py::arg("num_buckets"), py::arg("max_distance"),
        py::arg("bidirectional"), py::arg("key_padding_mask"), py::arg("mask_batch_stride"),
        py::arg("causal"), py::arg("query_offset"), py::arg("scale"), py::arg("num_threads"),
        "Fused attention on data pointers (fp32; validated by umt5_fast.ops.cpu.attention). "
        "Null pointers (0) mean no bias table / no padding mask.");
}

}  // namespace umt5_fast
