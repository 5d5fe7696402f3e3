// Weight-only int8 products for decoding on CPUs with AVX512-VNNI (see models/int8_kernel.py).
//
// A decode step multiplies a handful of activation rows by every weight matrix once, so its
// speed is the speed of streaming the int8 weights from memory. oneDNN's int8 linear reached
// 40-60 % of a float32 `mv`'s bandwidth on such shapes; this loop reads each weight row once per
// call, in tiles of four weight rows by up to four activation rows, which keeps a memory-bound
// product fed. Activations are quantised per row (one scale each) and shifted to unsigned
// bytes, because VPDPBUSD multiplies unsigned by signed bytes; the shift is undone with the
// weight rows' sums. Sums stay exact in int32 up to 65,536 input features (255 * 127 * 65,536).

#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <tuple>
#include <vector>

namespace {

constexpr int64_t kLanes = 64;  // int8 values per 512-bit register
constexpr int32_t kShift = 128;

template <typename scalar_t>
void quantize_rows(const scalar_t* x, int64_t rows, int64_t cols, uint8_t* out, float* scales) {
  for (int64_t m = 0; m < rows; ++m) {
    const scalar_t* row = x + m * cols;
    float largest = 0.f;
    for (int64_t k = 0; k < cols; ++k) largest = std::max(largest, std::fabs(static_cast<float>(row[k])));
    const float scale = largest > 0.f ? largest / 127.f : 1.f;
    const float inverse = 1.f / scale;
    for (int64_t k = 0; k < cols; ++k) {
      const int32_t q = static_cast<int32_t>(std::nearbyint(static_cast<float>(row[k]) * inverse));
      out[m * cols + k] = static_cast<uint8_t>(q + kShift);
    }
    scales[m] = scale;
  }
}

// kM activation rows times kN weight rows: kM * kN accumulators, so each weight load feeds kM
// products and each activation load kN (up to 16 accumulators, 4 weight and 1 activation
// register: 21 of AVX-512's 32).
template <int kN, int kM>
void dot_tile(const uint8_t* x, const int8_t* w, int64_t cols, int32_t* sums, int64_t sums_stride) {
  __m512i acc[kM][kN];
  for (int m = 0; m < kM; ++m)
    for (int n = 0; n < kN; ++n) acc[m][n] = _mm512_setzero_si512();
  for (int64_t k = 0; k < cols; k += kLanes) {
    const __mmask64 mask = k + kLanes <= cols ? ~0ULL : (~0ULL) >> (kLanes - (cols - k));
    __m512i weights[kN];
    for (int n = 0; n < kN; ++n) weights[n] = _mm512_maskz_loadu_epi8(mask, w + n * cols + k);
    for (int m = 0; m < kM; ++m) {
      const __m512i values = _mm512_maskz_loadu_epi8(mask, x + m * cols + k);
      for (int n = 0; n < kN; ++n) acc[m][n] = _mm512_dpbusd_epi32(acc[m][n], values, weights[n]);
    }
  }
  for (int m = 0; m < kM; ++m)
    for (int n = 0; n < kN; ++n) sums[m * sums_stride + n] = _mm512_reduce_add_epi32(acc[m][n]);
}

// All `rows` activation rows against kN weight rows, four activation rows at a time.
template <int kN>
void dot_rows(const uint8_t* x, int64_t rows, const int8_t* w, int64_t cols, int32_t* sums, int64_t sums_stride) {
  int64_t m = 0;
  for (; m + 4 <= rows; m += 4) dot_tile<kN, 4>(x + m * cols, w, cols, sums + m * sums_stride, sums_stride);
  const uint8_t* tail = x + m * cols;
  int32_t* tail_sums = sums + m * sums_stride;
  switch (rows - m) {
    case 3: dot_tile<kN, 3>(tail, w, cols, tail_sums, sums_stride); break;
    case 2: dot_tile<kN, 2>(tail, w, cols, tail_sums, sums_stride); break;
    case 1: dot_tile<kN, 1>(tail, w, cols, tail_sums, sums_stride); break;
    default: break;
  }
}

}  // namespace

// x (..., K) float32/bfloat16/float16; weight (N, K) int8; scales (N,) float32; row_sums (N,)
// int32, the sums of the weight rows; bias (N,) float32 or empty. Returns (..., N) in x's dtype.
torch::Tensor int8_linear(const torch::Tensor& x, const torch::Tensor& weight, const torch::Tensor& scales,
                          const torch::Tensor& row_sums, const torch::Tensor& bias) {
  TORCH_CHECK(weight.scalar_type() == torch::kInt8 && weight.dim() == 2 && weight.is_contiguous(),
              "weight must be a contiguous (N, K) int8 matrix");
  const int64_t out_features = weight.size(0), in_features = weight.size(1);
  TORCH_CHECK(x.size(-1) == in_features, "input has ", x.size(-1), " features, the weight ", in_features);
  TORCH_CHECK(in_features <= 65536, "int32 sums overflow past 65,536 input features, not ", in_features);
  TORCH_CHECK(scales.scalar_type() == torch::kFloat && scales.numel() == out_features, "one float scale per row");
  TORCH_CHECK(row_sums.scalar_type() == torch::kInt && row_sums.numel() == out_features, "one int32 sum per row");
  const bool has_bias = bias.numel() > 0;
  TORCH_CHECK(!has_bias || (bias.scalar_type() == torch::kFloat && bias.numel() == out_features),
              "bias must be empty or one float per row");

  const auto rows_in = x.reshape({-1, in_features}).contiguous();
  const int64_t rows = rows_in.size(0);
  auto quantized = torch::empty({rows, in_features}, torch::kUInt8);
  auto row_scales = torch::empty({rows}, torch::kFloat);
  auto output = torch::empty({rows, out_features}, x.options());

  AT_DISPATCH_FLOATING_TYPES_AND2(torch::kBFloat16, torch::kHalf, x.scalar_type(), "int8_linear", [&] {
    quantize_rows(rows_in.data_ptr<scalar_t>(), rows, in_features, quantized.data_ptr<uint8_t>(),
                  row_scales.data_ptr<float>());
    const uint8_t* xq = quantized.data_ptr<uint8_t>();
    const float* x_scale = row_scales.data_ptr<float>();
    const int8_t* w = weight.data_ptr<int8_t>();
    const float* w_scale = scales.data_ptr<float>();
    const int32_t* w_sum = row_sums.data_ptr<int32_t>();
    const float* b = has_bias ? bias.data_ptr<float>() : nullptr;
    scalar_t* y = output.data_ptr<scalar_t>();

    constexpr int64_t kBlock = 4;
    const int64_t blocks = (out_features + kBlock - 1) / kBlock;
    // Enough rows per task that a thread's share is worth waking it for (about 256 KB).
    const int64_t grain = std::max<int64_t>(1, (256 * 1024) / (kBlock * in_features));
    at::parallel_for(0, blocks, grain, [&](int64_t first, int64_t last) {
      std::vector<int32_t> sums(rows * kBlock);
      for (int64_t block = first; block < last; ++block) {
        const int64_t n0 = block * kBlock;
        const int64_t count = std::min(kBlock, out_features - n0);
        if (count == kBlock) {
          dot_rows<kBlock>(xq, rows, w + n0 * in_features, in_features, sums.data(), kBlock);
        } else {
          for (int64_t r = 0; r < count; ++r) {
            dot_rows<1>(xq, rows, w + (n0 + r) * in_features, in_features, sums.data() + r, kBlock);
          }
        }
        for (int64_t m = 0; m < rows; ++m) {
          for (int64_t r = 0; r < count; ++r) {
            const int64_t n = n0 + r;
            float value = static_cast<float>(sums[m * kBlock + r] - kShift * w_sum[n]) * x_scale[m] * w_scale[n];
            if (b != nullptr) value += b[n];
            y[m * out_features + n] = static_cast<scalar_t>(value);
          }
        }
      }
    });
  });

  auto shape = x.sizes().vec();
  shape.back() = out_features;
  return output.view(shape);
}

// Signed int8 rows and their scales, for `torch._int_mm`: the prompt path's operand.
std::tuple<torch::Tensor, torch::Tensor> quantize_rows_signed(const torch::Tensor& x) {
  const int64_t cols = x.size(-1);
  const auto rows_in = x.reshape({-1, cols}).contiguous();
  const int64_t rows = rows_in.size(0);
  auto quantized = torch::empty({rows, cols}, torch::kInt8);
  auto scales = torch::empty({rows, 1}, torch::kFloat);
  AT_DISPATCH_FLOATING_TYPES_AND2(torch::kBFloat16, torch::kHalf, x.scalar_type(), "quantize_rows_signed", [&] {
    const scalar_t* in = rows_in.data_ptr<scalar_t>();
    int8_t* out = quantized.data_ptr<int8_t>();
    float* scale = scales.data_ptr<float>();
    at::parallel_for(0, rows, 16, [&](int64_t first, int64_t last) {
      for (int64_t m = first; m < last; ++m) {
        const scalar_t* row = in + m * cols;
        float largest = 0.f;
        for (int64_t k = 0; k < cols; ++k) largest = std::max(largest, std::fabs(static_cast<float>(row[k])));
        scale[m] = largest > 0.f ? largest / 127.f : 1.f;
        const float inverse = 1.f / scale[m];
        for (int64_t k = 0; k < cols; ++k) {
          out[m * cols + k] = static_cast<int8_t>(std::nearbyint(static_cast<float>(row[k]) * inverse));
        }
      }
    });
  });
  return {quantized, scales};
}

// products (M, N) int32 -> products * row_scales (M, 1) * scales (N,) + bias (N,) in `dtype`, one pass.
torch::Tensor scale_products(const torch::Tensor& products, const torch::Tensor& row_scales,
                             const torch::Tensor& scales, const torch::Tensor& bias, torch::ScalarType dtype) {
  TORCH_CHECK(products.scalar_type() == torch::kInt && products.dim() == 2 && products.is_contiguous(),
              "products must be a contiguous (M, N) int32 matrix");
  const int64_t rows = products.size(0), cols = products.size(1);
  const bool has_bias = bias.numel() > 0;
  auto output = torch::empty({rows, cols}, torch::TensorOptions().dtype(dtype));
  AT_DISPATCH_FLOATING_TYPES_AND2(torch::kBFloat16, torch::kHalf, dtype, "scale_products", [&] {
    const int32_t* in = products.data_ptr<int32_t>();
    const float* row_scale = row_scales.data_ptr<float>();
    const float* scale = scales.data_ptr<float>();
    const float* b = has_bias ? bias.data_ptr<float>() : nullptr;
    scalar_t* out = output.data_ptr<scalar_t>();
    at::parallel_for(0, rows, 16, [&](int64_t first, int64_t last) {
      for (int64_t m = first; m < last; ++m) {
        for (int64_t n = 0; n < cols; ++n) {
          float value = static_cast<float>(in[m * cols + n]) * row_scale[m] * scale[n];
          if (b != nullptr) value += b[n];
          out[m * cols + n] = static_cast<scalar_t>(value);
        }
      }
    });
  });
  return output;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.def("int8_linear", &int8_linear, "x @ dequantised(weight).T + bias, for a few rows of x");
  module.def("quantize_rows_signed", &quantize_rows_signed, "int8 rows and one scale per row");
  module.def("scale_products", &scale_products, "int32 products scaled back to floats, plus bias");
}
