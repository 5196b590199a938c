// One single-token decode step of the whole UMT5 decoder stack in one call: per layer RMSNorm,
// self-attention against the static cache (the step's K/V written into it), cross-attention on
// the cached encoder K/V, gated FFN; then the final RMSNorm. The same kernels in the same order
// as umt5_fast.model's DecoderStack.run on the cpu backend, so the result is bit for bit the
// Python path's; what this saves is the ~100 Python-level op calls per step, which cost as much
// as the decoder layers' weight reads at batch 1 (umt5_fast/decode_step.py builds and checks
// the plan). Activations are fp32, or bf16 for a bf16 model: then every tensor the Python path
// holds in bf16 is rounded where it rounds (each linear's output, then its residual sum).
#include <algorithm>
#include <array>
#include <cstring>
#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "attention.h"
#include "bf16.h"
#include "ops.h"
#include "w8a8_linear.h"
#include "weight_only_linear.h"

namespace py = pybind11;

namespace umt5_fast {
namespace {

// The weight formats of umt5_fast.ops.cpu.linear's C++ kernels (fp32 activations).
// w8a8: column blocks, w8a8_rows: the row layout (w8a8_linear.h).
enum class WeightKind : int { none = -1, f32 = 0, bf16 = 1, int8 = 2, w8a8 = 3, w8a8_rows = 4 };

// (kind, weight pointer, scale pointer or 0, in_features, out_features), as Python passes it.
using LinearSpec = std::tuple<int, uintptr_t, uintptr_t, int64_t, int64_t>;

struct StepLinear {
  WeightKind kind = WeightKind::none;
  const void* weight = nullptr;
  const float* scale = nullptr;
  int64_t in_features = 0, out_features = 0;

  static StepLinear from_spec(const LinearSpec& spec, int64_t in_features, int64_t out_features,
                              const char* name) {
    StepLinear w;
    w.kind = static_cast<WeightKind>(std::get<0>(spec));
    w.weight = reinterpret_cast<const void*>(std::get<1>(spec));
    w.scale = reinterpret_cast<const float*>(std::get<2>(spec));
    w.in_features = std::get<3>(spec);
    w.out_features = std::get<4>(spec);
    const bool w8a8 = w.kind == WeightKind::w8a8 || w.kind == WeightKind::w8a8_rows;
    const bool known = w.kind == WeightKind::f32 || w.kind == WeightKind::bf16 || w.kind == WeightKind::int8 || w8a8;
    const bool scaled = w.kind == WeightKind::int8 || w8a8;
    if (!known || !w.weight || scaled != (w.scale != nullptr))
      throw std::invalid_argument(std::string("decoder step: bad weight spec for ") + name);
    if (w.in_features != in_features || w.out_features != out_features)
      throw std::invalid_argument(std::string("decoder step: ") + name + " must be [" +
                                  std::to_string(out_features) + ", " +
                                  std::to_string(in_features) + "]");
    if (w8a8 && (in_features < 1 || in_features > kW8A8MaxK))
      throw std::invalid_argument("decoder step: W8A8 in_features must be in [1, 65536]");
    return w;
  }

  // y = x @ W^T (+ residual), as umt5_fast.ops.cpu.linear computes it for this weight kind.
  // y may alias residual: every output element reads its residual before it is written.
  void apply(const float* x, const float* residual, float* y, int64_t rows, int threads) const {
    switch (kind) {
      case WeightKind::f32:
        return run_weight_only_linear<float>(
            {x, static_cast<const float*>(weight), nullptr, residual, y, rows, in_features,
             out_features}, threads);
      case WeightKind::bf16:
        return run_weight_only_linear<uint16_t>(
            {x, static_cast<const uint16_t*>(weight), nullptr, residual, y, rows, in_features,
             out_features}, threads);
      case WeightKind::int8:
        return run_weight_only_linear<int8_t>(
            {x, static_cast<const int8_t*>(weight), scale, residual, y, rows, in_features,
             out_features}, threads);
      case WeightKind::w8a8:
      case WeightKind::w8a8_rows:
        return run_w8a8_linear(x, static_cast<const int8_t*>(weight), kind == WeightKind::w8a8_rows, scale,
                               residual, y, rows, in_features, out_features, threads);
      case WeightKind::none:
        return;
    }
  }
};

struct StepLayer {
  const void* self_norm;    // norm weights: the activations' type
  const float* bias_table;  // [num_buckets, heads] fp32
  StepLinear q, k, v, o;
  const void* cross_norm;
  StepLinear cross_q, cross_o;
  const void* ffn_norm;
  StepLinear wi_0, wi_1, wo;  // wi_1.kind == none: not gated
};

// The row-wise steps in the activations' type T: float, or uint16_t (bf16 bits) with the bf16
// model's rounding points. `widened` / `sums` are fp32 scratch of rows x the widest layer.
template <typename T>
struct StepOps;

template <>
struct StepOps<float> {
  static constexpr AttentionElement element = AttentionElement::f32;
  static void norm(const float* x, const void* weight, float eps, float* out, int64_t rows,
                   int64_t dim, int threads) {
    run_rms_norm(x, nullptr, static_cast<const float*>(weight), eps, nullptr, out, rows, dim, threads);
  }
  static void project(const StepLinear& w, const float* x, const float* residual, float* y,
                      int64_t rows, float*, float*, int threads) {
    w.apply(x, residual, y, rows, threads);
  }
  static void activate(kernels::Activation activation, float* gate, const float* up, int64_t rows,
                       int64_t cols, int threads) {
    run_gated_activation(activation, gate, cols, up, cols, gate, cols, rows, cols, threads);
  }
};

template <>
struct StepOps<uint16_t> {
  static constexpr AttentionElement element = AttentionElement::bf16;
  static void norm(const uint16_t* x, const void* weight, float eps, uint16_t* out, int64_t rows,
                   int64_t dim, int threads) {
    run_rms_norm_half(x, static_cast<const uint16_t*>(weight), eps, out, rows, dim, threads);
  }
  // ops.cpu.linear of bf16 x: the kernel on the exactly widened x, its fp32 sums rounded to bf16,
  // then `+ residual` as a bf16 add (fp32 sum of the two, rounded again).
  static void project(const StepLinear& w, const uint16_t* x, const uint16_t* residual,
                      uint16_t* y, int64_t rows, float* widened, float* sums, int threads) {
    widen_bf16(x, widened, rows * w.in_features);
    w.apply(widened, nullptr, sums, rows, threads);
    for (int64_t i = 0; i < rows * w.out_features; ++i) {
      const uint16_t rounded = float_to_bf16(sums[i]);
      y[i] = residual ? float_to_bf16(bf16_to_float(rounded) + bf16_to_float(residual[i])) : rounded;
    }
  }
  static void activate(kernels::Activation activation, uint16_t* gate, const uint16_t* up,
                       int64_t rows, int64_t cols, int threads) {
    run_gated_activation_half(activation, gate, cols, up, cols, gate, cols, rows, cols, threads);
  }
};

// (self_norm, bias_table, cross_norm, ffn_norm) and the linears
// (q, k, v, o, cross_q, cross_o, wi_0, wi_1, wo), wi_1 = (-1, 0, 0, 0, 0) when not gated.
using LayerSpec = std::tuple<std::array<uintptr_t, 4>, std::array<LinearSpec, 9>>;

class DecoderStep {
 public:
  // bf16: the activations (hidden, caches, encoder K/V, norm weights) are bf16, a bf16 model's.
  DecoderStep(int64_t d_model, int64_t heads, int64_t d_kv, int64_t d_ff, int num_buckets,
              int max_distance, float eps, const std::string& activation,
              const std::vector<LayerSpec>& layers, uintptr_t final_norm, bool bf16)
      : d_model_(d_model), heads_(heads), d_kv_(d_kv), inner_(heads * d_kv), d_ff_(d_ff),
        num_buckets_(num_buckets), max_distance_(max_distance), eps_(eps),
        activation_(activation_from_name(activation)),
        final_norm_(reinterpret_cast<const void*>(final_norm)), bf16_(bf16) {
    if (d_model < 1 || heads < 1 || d_kv < 1 || d_ff < 1 || !final_norm_)
      throw std::invalid_argument("decoder step: sizes must be positive and final_norm set");
    for (const auto& [norms, linears] : layers) {
      StepLayer layer;
      layer.self_norm = reinterpret_cast<const void*>(norms[0]);
      layer.bias_table = reinterpret_cast<const float*>(norms[1]);
      layer.cross_norm = reinterpret_cast<const void*>(norms[2]);
      layer.ffn_norm = reinterpret_cast<const void*>(norms[3]);
      if (!layer.self_norm || !layer.bias_table || !layer.cross_norm || !layer.ffn_norm)
        throw std::invalid_argument("decoder step: every layer needs its norms and bias table");
      layer.q = StepLinear::from_spec(linears[0], d_model, inner_, "q");
      layer.k = StepLinear::from_spec(linears[1], d_model, inner_, "k");
      layer.v = StepLinear::from_spec(linears[2], d_model, inner_, "v");
      layer.o = StepLinear::from_spec(linears[3], inner_, d_model, "o");
      layer.cross_q = StepLinear::from_spec(linears[4], d_model, inner_, "cross q");
      layer.cross_o = StepLinear::from_spec(linears[5], inner_, d_model, "cross o");
      layer.wi_0 = StepLinear::from_spec(linears[6], d_model, d_ff, "wi_0");
      if (std::get<0>(linears[7]) != static_cast<int>(WeightKind::none))
        layer.wi_1 = StepLinear::from_spec(linears[7], d_model, d_ff, "wi_1");
      layer.wo = StepLinear::from_spec(linears[8], d_ff, d_model, "wo");
      // bf16 activations: the weights ops.cpu.linear multiplies bf16 x with in these kernels
      for (const StepLinear* w : {&layer.q, &layer.k, &layer.v, &layer.o, &layer.cross_q,
                                  &layer.cross_o, &layer.wi_0, &layer.wi_1, &layer.wo})
        if (bf16 && w->kind == WeightKind::f32)
          throw std::invalid_argument("decoder step: bf16 activations take bf16, int8 or W8A8 weights");
      layers_.push_back(layer);
    }
  }

  // hidden: [rows, d_model] embedded tokens (overwritten: the residual stream); out: [rows,
  // d_model] after the final norm. keys / values: [layers, rows, heads, max_length, d_kv] with
  // `cache_strides`; position < max_length is where this step's K/V go. cross_k / cross_v: per
  // layer [rows, heads, source_length, d_kv] with (batch, head, position) strides. All of them
  // hold fp32, or bf16 for a step built with bf16.
  void run(uintptr_t hidden, uintptr_t out, int64_t rows, int64_t position, uintptr_t keys,
           uintptr_t values, std::array<int64_t, 4> cache_strides,
           const std::vector<uintptr_t>& cross_k, const std::vector<std::array<int64_t, 3>>& k_strides,
           const std::vector<uintptr_t>& cross_v, const std::vector<std::array<int64_t, 3>>& v_strides,
           int64_t source_length, uintptr_t encoder_mask, int64_t mask_stride,
           int num_threads) const {
    const size_t n = layers_.size();
    if (cross_k.size() != n || cross_v.size() != n || k_strides.size() != n || v_strides.size() != n)
      throw std::invalid_argument("decoder step: one cross K/V pair per layer is needed");
    if (rows < 1 || position < 0 || source_length < 1)
      throw std::invalid_argument("decoder step: rows and source_length must be positive");
    py::gil_scoped_release no_gil;
    const auto stack = bf16_ ? &DecoderStep::run_stack<uint16_t> : &DecoderStep::run_stack<float>;
    (this->*stack)(reinterpret_cast<void*>(hidden), reinterpret_cast<void*>(out), rows, position,
                   reinterpret_cast<void*>(keys), reinterpret_cast<void*>(values), cache_strides,
                   cross_k, k_strides, cross_v, v_strides, source_length,
                   reinterpret_cast<const uint8_t*>(encoder_mask), mask_stride, num_threads);
  }

 private:
  template <typename T>
  void run_stack(void* hidden, void* out, int64_t rows, int64_t position, void* keys, void* values,
                 std::array<int64_t, 4> cache_strides, const std::vector<uintptr_t>& cross_k,
                 const std::vector<std::array<int64_t, 3>>& k_strides,
                 const std::vector<uintptr_t>& cross_v,
                 const std::vector<std::array<int64_t, 3>>& v_strides, int64_t source_length,
                 const uint8_t* encoder_mask, int64_t mask_stride, int num_threads) const {
    using Ops = StepOps<T>;
    T* h = static_cast<T*>(hidden);
    std::vector<T> normed(rows * d_model_), q(rows * inner_), k(rows * inner_), v(rows * inner_),
        attended(rows * inner_), gate(rows * d_ff_), up(rows * d_ff_);
    // fp32 scratch of the bf16 projections (none for fp32 activations)
    const int64_t widest = std::max({d_model_, inner_, d_ff_});
    std::vector<float> widened(bf16_ ? rows * widest : 0), sums(bf16_ ? rows * widest : 0);
    const auto project = [&](const StepLinear& w, const T* x, const T* residual, T* y) {
      Ops::project(w, x, residual, y, rows, widened.data(), sums.data(), num_threads);
    };
    const std::array<int64_t, 3> q_strides{inner_, d_kv_, inner_};  // [B, H, 1, D] view of [B, H*D]
    for (size_t i = 0; i < layers_.size(); ++i) {
      const StepLayer& layer = layers_[i];
      // Self-attention: the step's K/V go into the cache first, then the query reads them all.
      Ops::norm(h, layer.self_norm, eps_, normed.data(), rows, d_model_, num_threads);
      project(layer.q, normed.data(), nullptr, q.data());
      project(layer.k, normed.data(), nullptr, k.data());
      project(layer.v, normed.data(), nullptr, v.data());
      T* layer_keys = static_cast<T*>(keys) + i * cache_strides[0];
      T* layer_values = static_cast<T*>(values) + i * cache_strides[0];
      for (int64_t b = 0; b < rows; ++b)
        for (int64_t head = 0; head < heads_; ++head) {
          const int64_t at = b * cache_strides[1] + head * cache_strides[2] + position * cache_strides[3];
          std::memcpy(layer_keys + at, k.data() + b * inner_ + head * d_kv_, d_kv_ * sizeof(T));
          std::memcpy(layer_values + at, v.data() + b * inner_ + head * d_kv_, d_kv_ * sizeof(T));
        }
      const std::array<int64_t, 3> cache_bhs{cache_strides[1], cache_strides[2], cache_strides[3]};
      run_attention({q.data(), q_strides, layer_keys, cache_bhs, layer_values, cache_bhs,
                     attended.data(), rows, heads_, /*query_length=*/1, position + 1,
                     static_cast<int>(d_kv_), layer.bias_table, num_buckets_, max_distance_,
                     /*bidirectional=*/false, /*key_padding_mask=*/nullptr, 0, /*causal=*/true,
                     /*query_offset=*/position, /*scale=*/1.0f, num_threads, Ops::element});
      project(layer.o, attended.data(), h, h);

      // Cross-attention on the encoder K/V (no position bias).
      Ops::norm(h, layer.cross_norm, eps_, normed.data(), rows, d_model_, num_threads);
      project(layer.cross_q, normed.data(), nullptr, q.data());
      run_attention({q.data(), q_strides, reinterpret_cast<const T*>(cross_k[i]), k_strides[i],
                     reinterpret_cast<const T*>(cross_v[i]), v_strides[i], attended.data(),
                     rows, heads_, /*query_length=*/1, source_length, static_cast<int>(d_kv_),
                     /*bias_table=*/nullptr, num_buckets_, max_distance_, /*bidirectional=*/true,
                     encoder_mask, mask_stride, /*causal=*/false, /*query_offset=*/0,
                     /*scale=*/1.0f, num_threads, Ops::element});
      project(layer.cross_o, attended.data(), h, h);

      // Feed-forward: act(wi_0 x) * wi_1 x (or act(wi x)), then wo plus the residual.
      Ops::norm(h, layer.ffn_norm, eps_, normed.data(), rows, d_model_, num_threads);
      project(layer.wi_0, normed.data(), nullptr, gate.data());
      const bool gated = layer.wi_1.kind != WeightKind::none;
      if (gated) project(layer.wi_1, normed.data(), nullptr, up.data());
      Ops::activate(activation_, gate.data(), gated ? up.data() : nullptr, rows, d_ff_, num_threads);
      project(layer.wo, gate.data(), h, h);
    }
    Ops::norm(h, final_norm_, eps_, static_cast<T*>(out), rows, d_model_, num_threads);
  }

  int64_t d_model_, heads_, d_kv_, inner_, d_ff_;
  int num_buckets_, max_distance_;
  float eps_;
  kernels::Activation activation_;
  const void* final_norm_;
  bool bf16_;
  std::vector<StepLayer> layers_;
};

}  // namespace

void register_decoder_step(py::module_& m) {
  py::class_<DecoderStep>(m, "DecoderStep",
                          "A UMT5 decoder stack's single-token step on data pointers (built and "
                          "validated by umt5_fast.decode_step).")
      .def(py::init<int64_t, int64_t, int64_t, int64_t, int, int, float, const std::string&,
                    const std::vector<LayerSpec>&, uintptr_t, bool>(),
           py::kw_only(), py::arg("d_model"), py::arg("heads"), py::arg("d_kv"), py::arg("d_ff"),
           py::arg("num_buckets"), py::arg("max_distance"), py::arg("eps"),
           py::arg("activation"), py::arg("layers"), py::arg("final_norm"), py::arg("bf16"))
      .def("run", &DecoderStep::run, py::kw_only(), py::arg("hidden"), py::arg("out"),
           py::arg("rows"), py::arg("position"), py::arg("keys"), py::arg("values"),
           py::arg("cache_strides"), py::arg("cross_k"), py::arg("k_strides"), py::arg("cross_v"),
           py::arg("v_strides"), py::arg("source_length"), py::arg("encoder_mask"),
           py::arg("mask_stride"), py::arg("num_threads"));
}

}  // namespace umt5_fast
