// One single-token decode step of the whole UMT5 decoder stack in one call: per layer RMSNorm,
// self-attention against the static cache (the step's K/V written into it), cross-attention on
// the cached encoder K/V, gated FFN; then the final RMSNorm. The same kernels in the same order
// as umt5_fast.model's DecoderStack.run on the cpu backend, so the result is bit for bit the
// Python path's; what this saves is the ~100 Python-level op calls per step, which cost as much
// as the decoder layers' weight reads at batch 1 (umt5_fast/decode_step.py builds and checks
// the plan). Activations are fp32, or bf16 / fp16 for a bf16 / fp16 model: then every tensor the
// Python path holds in bf16 / fp16 is rounded where it rounds (each linear's output, then its
// residual sum). An fp16 model's residual stream is fp16 until its first fp32 `wo` (transformers
// keeps `wo` in fp32 there) and fp32 from then on, and while it is fp16 it is clamped after each
// sublayer as transformers clamps it.
#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "attention.h"
#include "bf16.h"
#include "fp16.h"
#include "kernels.h"
#include "ops.h"
#include "w8a8_linear.h"
#include "weight_only_linear.h"

namespace py = pybind11;

namespace umt5_fast {
namespace {

// The weight formats of umt5_fast.ops.cpu.linear's C++ kernels (fp32 activations).
// w8a8: column blocks, w8a8_rows: the row layout (w8a8_linear.h).
enum class WeightKind : int { none = -1, f32 = 0, bf16 = 1, int8 = 2, w8a8 = 3, w8a8_rows = 4, f16 = 5 };

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
    const bool known = w.kind == WeightKind::f32 || w.kind == WeightKind::bf16 || w.kind == WeightKind::f16 ||
                       w.kind == WeightKind::int8 || w8a8;
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
      case WeightKind::f16:
        return run_weight_only_linear<Fp16>(
            {x, static_cast<const Fp16*>(weight), nullptr, residual, y, rows, in_features,
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

// The row-wise steps in the activations' type T: float, uint16_t (bf16 bits) or Fp16 with the
// bf16 / fp16 model's rounding points. Stream: the residual stream's element; StreamState what
// the stream's rounding depends on. `widened` / `sums` are fp32 scratch of rows x the widest layer.
template <typename T>
struct StepOps;

template <>
struct StepOps<float> {
  using Stream = float;
  struct StreamState {};
  static constexpr AttentionElement element = AttentionElement::f32;
  static float* stream(void* hidden, std::vector<float>&, int64_t) { return static_cast<float*>(hidden); }
  static void norm(const float* x, const void* weight, float eps, float* out, int64_t rows,
                   int64_t dim, int threads) {
    run_rms_norm(x, nullptr, static_cast<const float*>(weight), eps, nullptr, out, rows, dim, threads);
  }
  static void project(const StepLinear& w, const float* x, float* y, int64_t rows, float*, float*, int threads) {
    w.apply(x, nullptr, y, rows, threads);
  }
  static void add_projection(const StepLinear& w, const float* x, float* h, StreamState&, int64_t rows, float*,
                             float*, int threads) {
    w.apply(x, h, h, rows, threads);
  }
  static void activate(kernels::Activation activation, float* gate, const float* up, int64_t rows,
                       int64_t cols, int threads) {
    run_gated_activation(activation, gate, cols, up, cols, gate, cols, rows, cols, threads);
  }
};

// What the bf16 and fp16 steps share (Half: uint16_t holding bf16 bits, or Fp16).
template <typename Half>
struct HalfStepOps {
  // ops.cpu.linear of Half x: the kernel on the exactly widened x, its fp32 sums in `sums`
  static void projection_sums(const StepLinear& w, const Half* x, int64_t rows, float* widened, float* sums,
                              int threads) {
    run_convert(x, widened, rows * w.in_features);
    w.apply(widened, nullptr, sums, rows, threads);
  }
  // the fp32 sums rounded to Half
  static void project(const StepLinear& w, const Half* x, Half* y, int64_t rows, float* widened, float* sums,
                      int threads) {
    projection_sums(w, x, rows, widened, sums, threads);
    run_convert(sums, y, rows * w.out_features);
  }
  static void activate(kernels::Activation activation, Half* gate, const Half* up, int64_t rows, int64_t cols,
                       int threads) {
    run_gated_activation(activation, gate, cols, up, cols, gate, cols, rows, cols, threads);
  }
};

template <>
struct StepOps<uint16_t> : HalfStepOps<uint16_t> {
  using Stream = uint16_t;
  struct StreamState {};
  static constexpr AttentionElement element = AttentionElement::bf16;
  static uint16_t* stream(void* hidden, std::vector<float>&, int64_t) { return static_cast<uint16_t*>(hidden); }
  static void norm(const uint16_t* x, const void* weight, float eps, uint16_t* out, int64_t rows,
                   int64_t dim, int threads) {
    run_rms_norm_half(x, static_cast<const uint16_t*>(weight), eps, out, rows, dim, threads);
  }
  // the projection rounded to bf16, then `h + y` as a bf16 add (fp32 sum of the two, rounded again)
  static void add_projection(const StepLinear& w, const uint16_t* x, uint16_t* h, StreamState&, int64_t rows,
                             float* widened, float* sums, int threads) {
    projection_sums(w, x, rows, widened, sums, threads);
    for (int64_t i = 0; i < rows * w.out_features; ++i)
      h[i] = float_to_bf16(bf16_to_float(float_to_bf16(sums[i])) + bf16_to_float(h[i]));
  }
};

// x[i] rounded to fp16 and widened back, in place (the vector conversions).
void round_through_fp16(float* x, int64_t n) {
  std::vector<Fp16> rounded(n);
  run_convert(x, rounded.data(), n);
  run_convert(rounded.data(), x, n);
}

template <>
struct StepOps<Fp16> : HalfStepOps<Fp16> {
  // fp32 storage: fp16 values while `half`, fp32 ones after the first fp32 `wo` (transformers'
  // type promotion of fp16 + fp32)
  using Stream = float;
  struct StreamState {
    bool half = true;
  };
  static constexpr AttentionElement element = AttentionElement::f16;
  static float* stream(void* hidden, std::vector<float>& storage, int64_t n) {
    storage.resize(n);
    run_convert(static_cast<const Fp16*>(hidden), storage.data(), n);
    return storage.data();
  }
  // (fp16 values in fp32 storage give the fp16 rows' bits: both kernels widen them exactly first)
  static void norm(const float* x, const void* weight, float eps, Fp16* out, int64_t rows, int64_t dim,
                   int threads) {
    run_rms_norm_half(x, static_cast<const Fp16*>(weight), eps, out, rows, dim, threads);
  }
  // An fp32 weight (`wo` kept in fp32) multiplies the widened x into fp32 outputs, added to the
  // stream in fp32; others round to fp16, then add as fp16 (or in fp32 to an fp32 stream). An fp16
  // stream is then clamped as transformers clamps it: to +-(65504 - 1000) (64512 in fp16) where any
  // value of the batch is inf, else to +-65504 (no change).
  static void add_projection(const StepLinear& w, const Fp16* x, float* h, StreamState& state, int64_t rows,
                             float* widened, float* sums, int threads) {
    projection_sums(w, x, rows, widened, sums, threads);
    const int64_t n = rows * w.out_features;
    if (w.kind == WeightKind::f32) {
      for (int64_t i = 0; i < n; ++i) h[i] += sums[i];
      state.half = false;
      return;
    }
    round_through_fp16(sums, n);  // the projection's fp16 output
    for (int64_t i = 0; i < n; ++i) h[i] += sums[i];
    if (!state.half) return;
    round_through_fp16(h, n);  // an fp16 add
    if (std::any_of(h, h + n, [](float x) { return std::isinf(x); }))
      for (int64_t i = 0; i < n; ++i) h[i] = std::isnan(h[i]) ? h[i] : std::clamp(h[i], -64512.0f, 64512.0f);
  }
};

// (self_norm, bias_table, cross_norm, ffn_norm) and the linears
// (q, k, v, o, cross_q, cross_o, wi_0, wi_1, wo), wi_1 = (-1, 0, 0, 0, 0) when not gated.
using LayerSpec = std::tuple<std::array<uintptr_t, 4>, std::array<LinearSpec, 9>>;

class DecoderStep {
 public:
  // activations: "float32", or "bfloat16" / "float16" where the activations (hidden, caches,
  // encoder K/V, norm weights) are a bf16 / fp16 model's.
  // distance_buckets: umt5_fast.buckets.distance_buckets of the causal buckets, kept alive by the caller.
  DecoderStep(int64_t d_model, int64_t heads, int64_t d_kv, int64_t d_ff, int num_buckets,
              int max_distance, uintptr_t distance_buckets, float eps, const std::string& activation,
              const std::vector<LayerSpec>& layers, uintptr_t final_norm, const std::string& activations)
      : d_model_(d_model), heads_(heads), d_kv_(d_kv), inner_(heads * d_kv), d_ff_(d_ff),
        num_buckets_(num_buckets), max_distance_(max_distance),
        distance_buckets_(reinterpret_cast<const int32_t*>(distance_buckets)), eps_(eps),
        activation_(activation_from_name(activation)),
        final_norm_(reinterpret_cast<const void*>(final_norm)),
        element_(activations == "bfloat16"  ? AttentionElement::bf16
                 : activations == "float16" ? AttentionElement::f16
                                            : AttentionElement::f32) {
    if (activations != "float32" && activations != "bfloat16" && activations != "float16")
      throw std::invalid_argument("decoder step: activations must be 'float32', 'bfloat16' or 'float16'");
    if (!distance_buckets_) throw std::invalid_argument("decoder step: distance_buckets is required");
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
      // bf16 / fp16 activations: the weights ops.cpu.linear multiplies their x with in these
      // kernels (an fp16 model's `wo` may be fp32: x widened for it, as the model widens it)
      const WeightKind own = element_ == AttentionElement::bf16 ? WeightKind::bf16 : WeightKind::f16;
      for (const StepLinear* w : {&layer.q, &layer.k, &layer.v, &layer.o, &layer.cross_q,
                                  &layer.cross_o, &layer.wi_0, &layer.wi_1, &layer.wo}) {
        const bool float_kind = w->kind == WeightKind::f32 || w->kind == WeightKind::bf16 || w->kind == WeightKind::f16;
        const bool fp32_wo = element_ == AttentionElement::f16 && w == &layer.wo && w->kind == WeightKind::f32;
        if (element_ != AttentionElement::f32 && float_kind && w->kind != own && !fp32_wo)
          throw std::invalid_argument("decoder step: bf16 / fp16 activations take weights of their dtype, int8 or "
                                      "W8A8 (fp16: an fp32 wo too)");
      }
      layers_.push_back(layer);
    }
  }

  // hidden: [rows, d_model] embedded tokens (overwritten: the residual stream); out: [rows,
  // d_model] after the final norm. keys / values: [layers, rows, heads, max_length, d_kv] with
  // `cache_strides`; position < max_length is where this step's K/V go. cross_k / cross_v: per
  // layer [rows, heads, source_length, d_kv] with (batch, head, position) strides. All of them
  // hold the activations' dtype (fp32, bf16 or fp16).
  void run(uintptr_t hidden, uintptr_t out, int64_t rows, int64_t position, uintptr_t keys,
           uintptr_t values, std::array<int64_t, 4> cache_strides,
           const std::vector<uintptr_t>& cross_k, const std::vector<std::array<int64_t, 3>>& k_strides,
           const std::vector<uintptr_t>& cross_v, const std::vector<std::array<int64_t, 3>>& v_strides,
           int64_t source_length, uintptr_t encoder_mask, int64_t mask_stride, int num_threads) const {
    const size_t n = layers_.size();
    if (cross_k.size() != n || cross_v.size() != n || k_strides.size() != n || v_strides.size() != n)
      throw std::invalid_argument("decoder step: one cross K/V pair per layer is needed");
    if (rows < 1 || position < 0 || source_length < 1)
      throw std::invalid_argument("decoder step: rows and source_length must be positive");
    py::gil_scoped_release no_gil;
    const auto stack = element_ == AttentionElement::bf16  ? &DecoderStep::run_stack<uint16_t>
                       : element_ == AttentionElement::f16 ? &DecoderStep::run_stack<Fp16>
                                                           : &DecoderStep::run_stack<float>;
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
    std::vector<float> stream_storage;  // (an fp16 model's stream: fp32 storage)
    typename Ops::Stream* h = Ops::stream(hidden, stream_storage, rows * d_model_);
    typename Ops::StreamState stream_state;
    std::vector<T> normed(rows * d_model_), q(rows * inner_), k(rows * inner_), v(rows * inner_),
        attended(rows * inner_), gate(rows * d_ff_), up(rows * d_ff_);
    // fp32 scratch of the half-precision projections (none for fp32 activations)
    const int64_t scratch = std::is_same_v<T, float> ? 0 : rows * std::max({d_model_, inner_, d_ff_});
    std::vector<float> widened(scratch), sums(scratch);
    const auto project = [&](const StepLinear& w, const T* x, T* y) {
      Ops::project(w, x, y, rows, widened.data(), sums.data(), num_threads);
    };
    const auto add_projection = [&](const StepLinear& w, const T* x) {
      Ops::add_projection(w, x, h, stream_state, rows, widened.data(), sums.data(), num_threads);
    };
    const std::array<int64_t, 3> q_strides{inner_, d_kv_, inner_};  // [B, H, 1, D] view of [B, H*D]
    for (size_t i = 0; i < layers_.size(); ++i) {
      const StepLayer& layer = layers_[i];
      // Self-attention: the step's K/V go into the cache first, then the query reads them all.
      Ops::norm(h, layer.self_norm, eps_, normed.data(), rows, d_model_, num_threads);
      project(layer.q, normed.data(), q.data());
      project(layer.k, normed.data(), k.data());
      project(layer.v, normed.data(), v.data());
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
                     static_cast<int>(d_kv_), layer.bias_table, distance_buckets_, num_buckets_, max_distance_,
                     /*bidirectional=*/false, /*key_padding_mask=*/nullptr, 0, /*causal=*/true,
                     /*query_offset=*/position, /*scale=*/1.0f, num_threads, Ops::element});
      add_projection(layer.o, attended.data());

      // Cross-attention on the encoder K/V (no position bias).
      Ops::norm(h, layer.cross_norm, eps_, normed.data(), rows, d_model_, num_threads);
      project(layer.cross_q, normed.data(), q.data());
      run_attention({q.data(), q_strides, reinterpret_cast<const T*>(cross_k[i]), k_strides[i],
                     reinterpret_cast<const T*>(cross_v[i]), v_strides[i], attended.data(), rows,
                     heads_, /*query_length=*/1, source_length, static_cast<int>(d_kv_),
                     /*bias_table=*/nullptr, /*distance_buckets=*/nullptr, num_buckets_, max_distance_,
                     /*bidirectional=*/true,
                     encoder_mask, mask_stride, /*causal=*/false, /*query_offset=*/0,
                     /*scale=*/1.0f, num_threads, Ops::element});
      add_projection(layer.cross_o, attended.data());

      // Feed-forward: act(wi_0 x) * wi_1 x (or act(wi x)), then wo plus the residual.
      Ops::norm(h, layer.ffn_norm, eps_, normed.data(), rows, d_model_, num_threads);
      project(layer.wi_0, normed.data(), gate.data());
      const bool gated = layer.wi_1.kind != WeightKind::none;
      if (gated) project(layer.wi_1, normed.data(), up.data());
      Ops::activate(activation_, gate.data(), gated ? up.data() : nullptr, rows, d_ff_, num_threads);
      add_projection(layer.wo, gate.data());
    }
    Ops::norm(h, final_norm_, eps_, static_cast<T*>(out), rows, d_model_, num_threads);
  }

  int64_t d_model_, heads_, d_kv_, inner_, d_ff_;
  int num_buckets_, max_distance_;
  const int32_t* distance_buckets_;
  float eps_;
  kernels::Activation activation_;
  const void* final_norm_;
  AttentionElement element_;  // of the activations
  std::vector<StepLayer> layers_;
};

}  // namespace

void register_decoder_step(py::module_& m) {
  py::class_<DecoderStep>(m, "DecoderStep",
                          "A UMT5 decoder stack's single-token step on data pointers (built and "
                          "validated by umt5_fast.decode_step).")
      .def(py::init<int64_t, int64_t, int64_t, int64_t, int, int, uintptr_t, float, const std::string&,
                    const std::vector<LayerSpec>&, uintptr_t, const std::string&>(),
           py::kw_only(), py::arg("d_model"), py::arg("heads"), py::arg("d_kv"), py::arg("d_ff"),
           py::arg("num_buckets"), py::arg("max_distance"), py::arg("distance_buckets"), py::arg("eps"),
           py::arg("activation"), py::arg("layers"), py::arg("final_norm"), py::arg("activations"))
      .def("run", &DecoderStep::run, py::kw_only(), py::arg("hidden"), py::arg("out"),
           py::arg("rows"), py::arg("position"), py::arg("keys"), py::arg("values"),
           py::arg("cache_strides"), py::arg("cross_k"), py::arg("k_strides"), py::arg("cross_v"),
           py::arg("v_strides"), py::arg("source_length"), py::arg("encoder_mask"),
           py::arg("mask_stride"), py::arg("num_threads"));
}

}  // namespace umt5_fast
