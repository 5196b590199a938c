// C++ entry points of the row-wise ops (ISA dispatch and threading included), shared by their
// Python bindings and by decoder_step.cpp. Inputs are validated by the caller; fp32 rows are
// contiguous.
#pragma once

#include <cstdint>
#include <string>

#include "kernels.h"

namespace umt5_fast {

// out = rms_norm(h) with h = x, or h = x + residual (written to hidden) when residual is not null.
void run_rms_norm(const float* x, const float* residual, const float* weight, float eps,
                  float* hidden, float* out, int64_t rows, int64_t dim, int num_threads);

// transformers' T5LayerNorm in a bf16 or fp16 model: fp32 variance, h = x * rsqrt rounded to Half
// (uint16_t: bf16 bits, or Fp16), then times the Half weight (rounded again). X is Half, or float
// with Fp16 (an fp16 model's fp32 residual stream).
template <typename X, typename Half>
void run_rms_norm_half(const X* x, const Half* weight, float eps, Half* out, int64_t rows, int64_t dim,
                       int num_threads);

// out[i] = in[i] widened (bf16 bits in uint16_t or Fp16 -> float, exact) or rounded (float -> them,
// nearest even) by the selected ISA's vector conversions; single-threaded.
template <typename From, typename To>
void run_convert(const From* in, To* out, int64_t n);

// "gelu_tanh", "gelu_erf", "relu" or "silu"; std::invalid_argument for any other name.
kernels::Activation activation_from_name(const std::string& name);

// out = act(a) * b (or act(a) when b is null); out may alias a. T: float, or bf16 (uint16_t) /
// Fp16 rows, computed in fp32 and rounded once.
template <typename T>
void run_gated_activation(kernels::Activation activation, const T* a, int64_t a_row_stride, const T* b,
                          int64_t b_row_stride, T* out, int64_t out_row_stride, int64_t rows, int64_t cols,
                          int num_threads);

// y = int8(x) @ qweight^T, rescaled (+ residual): see w8a8_linear.h. in_features in [1, 65536].
// row_layout: qweight holds plain [out_features, in_features] int8 rows, else the column blocks.
void run_w8a8_linear(const float* x, const int8_t* qweight, bool row_layout, const float* scale,
                     const float* residual, float* y, int64_t rows, int64_t in_features,
                     int64_t out_features, int num_threads);

// out[r] = ||x_r - scale_r q_r|| in fp64 for the int8 rows q and scales run_w8a8_linear quantises
// fp32 x [rows, in_features] to (NaN for a row with inf / NaN).
void w8a8_quantisation_error(const float* x, int64_t rows, int64_t in_features, double* out, int num_threads);

}  // namespace umt5_fast
