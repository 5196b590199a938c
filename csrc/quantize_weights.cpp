// Per-output-row symmetric int8 quantisation of a float weight at load time, bit for bit what
// umt5_fast.quant.QuantizedWeight.quantize computes in torch (and for W8A8, written straight into
// the kernel's column blocks, W8A8Weight.pack of it):
//   scale = max(amax(|w|), 1e-12) / 127;  q = clamp(round_half_even(w / scale), -127, 127)
// with w widened to fp32 first (exact from bf16 / fp16). One pass over the weight instead of
// torch's five full-size temporaries: umt5-xxl's encoder quantises in seconds, not a minute.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include <pybind11/pybind11.h>

#include "bf16.h"
#include "parallel.h"
#include "w8a8_linear.h"

namespace py = pybind11;

namespace umt5_fast {
namespace {

float half_to_float(uint16_t h) {  // IEEE fp16 -> fp32, exact (subnormals included)
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exponent = (h >> 10) & 0x1Fu, mantissa = h & 0x3FFu, bits;
  if (exponent == 0x1F) {
    bits = sign | 0x7F800000u | (mantissa << 13);
  } else if (exponent != 0) {
    bits = sign | ((exponent + 112) << 23) | (mantissa << 13);
  } else if (mantissa == 0) {
    bits = sign;
  } else {  // subnormal: normalise
    exponent = 113;
    while (!(mantissa & 0x400u)) {
      mantissa <<= 1;
      --exponent;
    }
    bits = sign | (exponent << 23) | ((mantissa & 0x3FFu) << 13);
  }
  float out;
  std::memcpy(&out, &bits, sizeof(out));
  return out;
}

// Where entry k of a quantised row goes: q[index(k)] (row layout: q[k]; W8A8 blocks: see
// w8a8_linear.h, q pointing at the row's block).
struct RowLayout {
  int64_t lane = -1;  // the row's column in its W8A8 block, or -1 for plain rows
  int64_t groups = 0, tail = 0;

  int64_t operator()(int64_t k) const {
    if (lane < 0) return k;
    if (k < 4 * groups) return k / 4 * (4 * kW8A8BlockColumns) + 4 * lane + k % 4;
    return groups * (4 * kW8A8BlockColumns) + lane * tail + (k - 4 * groups);
  }
};

template <typename Widen>
void quantise_row(const Widen& widen, int64_t cols, float* row, int8_t* q, const RowLayout& layout,
                  float* scale, bool* finite) {
  float amax = 0.0f;
  bool all_finite = true;
  for (int64_t i = 0; i < cols; ++i) {
    row[i] = widen(i);
    amax = std::max(amax, std::fabs(row[i]));
    all_finite &= std::isfinite(row[i]);
  }
  *finite = all_finite;
  const float s = std::max(amax, 1e-12f) / 127.0f;
  *scale = s;
  for (int64_t i = 0; i < cols; ++i) q[layout(i)] = round_to_int8(row[i] / s);
}

}  // namespace

void register_quantize_weights(py::module_& m) {
  m.def("quantize_int8_rows",
        [](uintptr_t weight, const std::string& dtype, int64_t rows, int64_t cols, uintptr_t qweight,
           uintptr_t scale, bool w8a8_blocks, int num_threads) {
          if (dtype != "float32" && dtype != "bfloat16" && dtype != "float16")
            throw std::invalid_argument("quantize_int8_rows: dtype must be float32, bfloat16 or float16");
          bool all_finite = true;
          {
            py::gil_scoped_release no_gil;
            std::vector<char> row_finite(rows, 1);
            const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(cols, 1));
            parallel_for_ranges(rows, grain, num_threads, [&](int64_t begin, int64_t end) {
              std::vector<float> row(cols);
              for (int64_t r = begin; r < end; ++r) {
                RowLayout layout;
                int8_t* q = reinterpret_cast<int8_t*>(qweight) + r * cols;
                if (w8a8_blocks) {
                  layout = {r % kW8A8BlockColumns, cols / 4, cols % 4};
                  q = reinterpret_cast<int8_t*>(qweight) + r / kW8A8BlockColumns * kW8A8BlockColumns * cols;
                }
                float* s = reinterpret_cast<float*>(scale) + r;
                bool finite = true;
                if (dtype == "float32") {
                  const float* w = reinterpret_cast<const float*>(weight) + r * cols;
                  quantise_row([&](int64_t i) { return w[i]; }, cols, row.data(), q, layout, s, &finite);
                } else if (dtype == "bfloat16") {
                  const uint16_t* w = reinterpret_cast<const uint16_t*>(weight) + r * cols;
                  quantise_row([&](int64_t i) { return bf16_to_float(w[i]); }, cols, row.data(), q, layout, s, &finite);
                } else {
                  const uint16_t* w = reinterpret_cast<const uint16_t*>(weight) + r * cols;
                  quantise_row([&](int64_t i) { return half_to_float(w[i]); }, cols, row.data(), q, layout, s, &finite);
                }
                row_finite[r] = finite;
              }
            });
            all_finite = std::all_of(row_finite.begin(), row_finite.end(), [](char f) { return f != 0; });
          }
          return all_finite;
        },
        py::kw_only(), py::arg("weight"), py::arg("dtype"), py::arg("rows"), py::arg("cols"),
        py::arg("qweight"), py::arg("scale"), py::arg("w8a8_blocks"), py::arg("num_threads"),
        "Per-row int8 quantisation of a contiguous float weight (data pointers) into plain rows or, "
        "with w8a8_blocks, W8A8Weight's column blocks (qweight zeroed by the caller: rows past the "
        "last are left as they are); returns False when the weight holds inf or NaN (its int8 "
        "values are then meaningless).");
}

}  // namespace umt5_fast
