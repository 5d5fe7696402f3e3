// Decoding kernels for CPUs with AVX512-VNNI (see models/cpu_kernel.py): int8 weight products,
// float32 LoRA products, single-token attention, layer norm and GELU, and whole GPT-NeoX layers
// built from them.
//
// A decode step multiplies a handful of activation rows by every weight matrix once, so its
// speed is the speed of streaming the int8 weights from memory. oneDNN's int8 linear reached
// 40-60 % of a float32 `mv`'s bandwidth on such shapes; this loop reads each weight row once per
// call, in blocks of 16 weight rows (tiles of up to 16 accumulators each), prefetching each row
// ahead, which keeps a memory-bound product fed. Activations are quantised per row (one scale
// each) and shifted to unsigned bytes, because VPDPBUSD multiplies unsigned by signed bytes; the
// shift is undone with the weight rows' sums. Sums stay exact in int32 up to 65,536 input
// features (255 * 127 * 65,536).

#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <limits>
#include <map>
#include <memory>
#include <string>
#include <tuple>
#include <vector>

namespace {

constexpr int64_t kLanes = 64;  // int8 values per 512-bit register
constexpr int32_t kShift = 128;

// 16 values of a row as float32.
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const double* p) {
  const __m256 low = _mm512_cvtpd_ps(_mm512_loadu_pd(p)), high = _mm512_cvtpd_ps(_mm512_loadu_pd(p + 8));
  const __m512i both = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_castps_si256(low)), _mm256_castps_si256(high), 1);
  return _mm512_castsi512_ps(both);
}
inline __m512 load16(const c10::BFloat16* p) {
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}
inline __m512 load16(const c10::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

// 16 float32 lanes stored as the tensor's dtype, rounded to nearest even as PyTorch rounds.
inline void store16(float* p, __m512 v) { _mm512_storeu_ps(p, v); }
inline void store16(double* p, __m512 v) {
  _mm512_storeu_pd(p, _mm512_cvtps_pd(_mm512_castps512_ps256(v)));
  _mm512_storeu_pd(p + 8, _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1))));
}
inline void store16(c10::BFloat16* p, __m512 v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF))), 16);
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  rounded = _mm512_mask_mov_epi32(rounded, nan, _mm512_set1_epi32(0x7FC0));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(rounded));
}
inline void store16(c10::Half* p, __m512 v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

// The last `count` (< 16) values of a row, through float32 lanes.
template <typename scalar_t>
inline __m512 load_tail(const scalar_t* p, int64_t count) {
  alignas(64) float lanes[16] = {};
  for (int64_t i = 0; i < count; ++i) lanes[i] = static_cast<float>(p[i]);
  return _mm512_load_ps(lanes);
}
template <typename scalar_t>
inline void store_tail(scalar_t* p, __m512 v, int64_t count) {
  alignas(64) float lanes[16];
  _mm512_store_ps(lanes, v);
  for (int64_t i = 0; i < count; ++i) p[i] = static_cast<scalar_t>(lanes[i]);
}


// One row quantised: its largest magnitude maps to 127, the values are rounded to nearest even
// (as `nearbyint` rounds) and `shift` is added: 128 for the unsigned bytes VPDPBUSD takes, 0 for
// the signed ones `_int_mm` takes. 16 values at a time; returns the row's scale.
template <int32_t shift, typename scalar_t, typename out_t>
float quantize_row(const scalar_t* row, int64_t cols, out_t* out) {
  const int64_t whole = cols - cols % 16;
  __m512 largest = _mm512_setzero_ps();
  for (int64_t k = 0; k < whole; k += 16) largest = _mm512_max_ps(largest, _mm512_abs_ps(load16(row + k)));
  if (whole < cols) largest = _mm512_max_ps(largest, _mm512_abs_ps(load_tail(row + whole, cols - whole)));
  const float top = _mm512_reduce_max_ps(largest);
  const float scale = top > 0.f ? top / 127.f : 1.f;
  const __m512 inverse = _mm512_set1_ps(1.f / scale);
  const auto quantize = [&](__m512 values) {
    return _mm512_cvtepi32_epi8(
        _mm512_add_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(values, inverse)), _mm512_set1_epi32(shift)));
  };
  for (int64_t k = 0; k < whole; k += 16) _mm_storeu_si128(reinterpret_cast<__m128i*>(out + k), quantize(load16(row + k)));
  if (whole < cols) {
    alignas(16) out_t tail[16];
    _mm_store_si128(reinterpret_cast<__m128i*>(tail), quantize(load_tail(row + whole, cols - whole)));
    std::copy(tail, tail + (cols - whole), out + whole);
  }
  return scale;
}

// How far ahead, in bytes, each weight row is prefetched. The hardware prefetchers alone left a
// core's stream of a few rows at about 80 % of a float32 `mv`'s bandwidth; asking for each row's
// next lines four iterations ahead, over 16 rows at a time, matched it.
constexpr int64_t kPrefetch = 256;

// kM activation rows times kN weight rows: kM * kN accumulators, so each weight load feeds kM
// products and each activation load kN (at most 16 accumulators, which leaves registers for
// the loads: AVX-512 has 32). The first `prefetch_rows` rows from `w` are prefetched ahead:
// the tile's own rows, or the whole block when the tile is the first of several that share it.
// Near the end of its rows the prefetch moves `next_block` bytes on, to the start of the next
// block's rows, so that a block starts warm instead of with 16 misses at once (rows are
// contiguous, so without the jump it would fetch the next row of this block, already read):
// about 4 % of a Polyglot-Ko step's weight streaming.
template <int kN, int kM>
void dot_tile(const uint8_t* x, const int8_t* w, int64_t cols, int32_t* sums, int64_t sums_stride,
              int prefetch_rows, int64_t next_block) {
  __m512i acc[kM][kN];
  for (int m = 0; m < kM; ++m)
    for (int n = 0; n < kN; ++n) acc[m][n] = _mm512_setzero_si512();
  const int64_t whole = cols - cols % kLanes;
  for (int64_t k = 0; k < whole; k += kLanes) {
    __m512i weights[kN];
    const int64_t ahead = k + kPrefetch < cols ? k + kPrefetch : k + kPrefetch + next_block;
    for (int n = 0; n < prefetch_rows; ++n)
      _mm_prefetch(reinterpret_cast<const char*>(w + n * cols + ahead), _MM_HINT_T0);
    for (int n = 0; n < kN; ++n) weights[n] = _mm512_loadu_si512(w + n * cols + k);
    for (int m = 0; m < kM; ++m) {
      const __m512i values = _mm512_loadu_si512(x + m * cols + k);
      for (int n = 0; n < kN; ++n) acc[m][n] = _mm512_dpbusd_epi32(acc[m][n], values, weights[n]);
    }
  }
  if (whole < cols) {
    const __mmask64 mask = (~0ULL) >> (kLanes - (cols - whole));
    for (int m = 0; m < kM; ++m) {
      const __m512i values = _mm512_maskz_loadu_epi8(mask, x + m * cols + whole);
      for (int n = 0; n < kN; ++n) {
        const __m512i weights = _mm512_maskz_loadu_epi8(mask, w + n * cols + whole);
        acc[m][n] = _mm512_dpbusd_epi32(acc[m][n], values, weights);
      }
    }
  }
  for (int m = 0; m < kM; ++m)
    for (int n = 0; n < kN; ++n) sums[m * sums_stride + n] = _mm512_reduce_add_epi32(acc[m][n]);
}

// kN weight rows (kN a multiple of 4, at most 16) against all `rows` activation rows: four
// activation rows at a time against four weight rows, and a last one or two rows against wider
// tiles, so that a single row (the batch-1 step) streams 16 weight rows at once. The block comes
// from memory once, prefetched by its first tile; the other tiles find it in cache.
template <int kN>
void dot_rows(const uint8_t* x, int64_t rows, const int8_t* w, int64_t cols, int32_t* sums, int64_t sums_stride) {
  int prefetch = kN;  // until the first tile has run
  const int64_t next_block = (kN - 1) * cols;
  int64_t m = 0;
  for (; m + 4 <= rows; m += 4) {
    for (int n = 0; n < kN; n += 4) {
      dot_tile<4, 4>(x + m * cols, w + n * cols, cols, sums + m * sums_stride + n, sums_stride, prefetch, next_block);
      prefetch = 0;
    }
  }
  const uint8_t* tail = x + m * cols;
  int32_t* tail_sums = sums + m * sums_stride;
  switch (rows - m) {
    case 3:
      for (int n = 0; n < kN; n += 4) {
        dot_tile<4, 3>(tail, w + n * cols, cols, tail_sums + n, sums_stride, prefetch, next_block);
        prefetch = 0;
      }
      break;
    case 2:
      for (int n = 0; n < kN; n += 8) {
        dot_tile<8, 2>(tail, w + n * cols, cols, tail_sums + n, sums_stride, prefetch, next_block);
        prefetch = 0;
      }
      break;
    case 1: dot_tile<kN, 1>(tail, w, cols, tail_sums, sums_stride, prefetch, next_block); break;
    default: break;
  }
}

// The last rows of a matrix whose height is not a multiple of the block: one weight row at a time.
void dot_single_rows(const uint8_t* x, int64_t rows, const int8_t* w, int64_t count, int64_t cols, int32_t* sums,
                     int64_t sums_stride) {
  for (int64_t r = 0; r < count; ++r)
    for (int64_t m = 0; m < rows; ++m)
      dot_tile<1, 1>(x + m * cols, w + r * cols, cols, sums + m * sums_stride + r, sums_stride, m == 0 ? 1 : 0, 0);
}


// How far ahead a float32 factor is prefetched. A thread reads its rows of a LoRA factor one
// after another, a single stream, which needs more in flight than the int8 kernel's 16 rows
// each need: 2 KB ahead streamed LoRA's products about 5 % faster than 256 bytes.
constexpr int64_t kFloatPrefetch = 2048;

// dot(a, b) over n floats, with each of a's lines prefetched ahead (a is the streamed weight row).
inline float dot_floats(const float* a, const float* b, int64_t n) {
  __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 32 <= n; k += 32) {
    _mm_prefetch(reinterpret_cast<const char*>(a + k) + kFloatPrefetch, _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(a + k) + kFloatPrefetch + 64, _MM_HINT_T0);
    acc0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + k), _mm512_loadu_ps(b + k), acc0);
    acc1 = _mm512_fmadd_ps(_mm512_loadu_ps(a + k + 16), _mm512_loadu_ps(b + k + 16), acc1);
  }
  for (; k < n; k += 16) {
    const __mmask16 mask = k + 16 <= n ? 0xFFFF : static_cast<__mmask16>((1u << (n - k)) - 1);
    acc0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mask, a + k), _mm512_maskz_loadu_ps(mask, b + k), acc0);
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
}

// out (M, N) = in (M, K) @ weight (N, K).T, float32, parallel over the weight's rows: LoRA's
// first product, whose rows are long (K = the model's width).
void float_rows_times(const float* in, int64_t rows, const float* weight, int64_t out_features, int64_t in_features,
                      float* out) {
  const int64_t grain = std::max<int64_t>(1, (64 * 1024) / (4 * in_features));
  at::parallel_for(0, out_features, grain, [&](int64_t first, int64_t last) {
    for (int64_t n = first; n < last; ++n)
      for (int64_t m = 0; m < rows; ++m)
        out[m * out_features + n] = dot_floats(weight + n * in_features, in + m * in_features, in_features);
  });
}

// LoRA's second product, added into the result: result[m][n] += round(scaling * (low[m] . b[n])),
// rounded as PEFT rounds (the float32 update to the result's dtype, then the sum). b's rows are
// short (the rank), so eight are summed at once, and prefetched 16 rows ahead: one row at a time
// streamed b at about 55 % of a float32 `mv`'s bandwidth, this at about 85 %.
template <typename scalar_t>
void add_low_rank(const float* low, int64_t rows, const float* b, int64_t out_features, int64_t rank, float scaling,
                  scalar_t* result) {
  const int64_t grain = std::max<int64_t>(4, (64 * 1024) / (4 * rank));
  at::parallel_for(0, out_features, grain, [&](int64_t first, int64_t last) {
    auto add = [&](int64_t m, int64_t n, float dot) {
      scalar_t& target = result[m * out_features + n];
      target = static_cast<scalar_t>(static_cast<float>(target) + static_cast<float>(static_cast<scalar_t>(dot * scaling)));
    };
    constexpr int kGroup = 8;
    int64_t n = first;
    if (rank % 16 == 0) {
      for (; n + kGroup <= last; n += kGroup) {
        for (int64_t m = 0; m < rows; ++m) {
          const float* x = low + m * rank;
          __m512 acc[kGroup];
          for (int r = 0; r < kGroup; ++r) acc[r] = _mm512_setzero_ps();
          for (int64_t k = 0; k < rank; k += 16) {
            const __m512 values = _mm512_loadu_ps(x + k);
            for (int r = 0; r < kGroup; ++r) {
              const float* row = b + (n + r) * rank + k;
              if (m == 0) _mm_prefetch(reinterpret_cast<const char*>(row) + 16 * kPrefetch, _MM_HINT_T0);
              acc[r] = _mm512_fmadd_ps(_mm512_loadu_ps(row), values, acc[r]);
            }
          }
          for (int r = 0; r < kGroup; ++r) add(m, n + r, _mm512_reduce_add_ps(acc[r]));
        }
      }
    }
    for (; n < last; ++n)
      for (int64_t m = 0; m < rows; ++m) add(m, n, dot_floats(b + n * rank, low + m * rank, rank));
  });
}

// Rotary embedding of one head's query or key, as `apply_rotary_pos_emb` computes it: each
// product and the sum rounded to the model's dtype, the dimensions past `rotary` copied.
template <typename scalar_t>
void rotate(const scalar_t* in, const scalar_t* cos, const scalar_t* sin, int64_t rotary, int64_t dims, scalar_t* out) {
  const int64_t half = rotary / 2;
  for (int64_t i = 0; i < rotary; ++i) {
    const scalar_t turned = i < half ? static_cast<scalar_t>(-static_cast<float>(in[i + half])) : in[i - half];
    const scalar_t straight = static_cast<scalar_t>(static_cast<float>(in[i]) * static_cast<float>(cos[i]));
    const scalar_t crossed = static_cast<scalar_t>(static_cast<float>(turned) * static_cast<float>(sin[i]));
    out[i] = static_cast<scalar_t>(static_cast<float>(straight) + static_cast<float>(crossed));
  }
  for (int64_t i = rotary; i < dims; ++i) out[i] = in[i];
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
    for (int64_t m = 0; m < rows; ++m)
      row_scales.data_ptr<float>()[m] = quantize_row<kShift>(rows_in.data_ptr<scalar_t>() + m * in_features,
                                                             in_features, quantized.data_ptr<uint8_t>() + m * in_features);
    const uint8_t* xq = quantized.data_ptr<uint8_t>();
    const float* x_scale = row_scales.data_ptr<float>();
    const int8_t* w = weight.data_ptr<int8_t>();
    const float* w_scale = scales.data_ptr<float>();
    const int32_t* w_sum = row_sums.data_ptr<int32_t>();
    const float* b = has_bias ? bias.data_ptr<float>() : nullptr;
    scalar_t* y = output.data_ptr<scalar_t>();

    constexpr int64_t kBlock = 16;
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
          dot_single_rows(xq, rows, w + n0 * in_features, count, in_features, sums.data(), kBlock);
        }
        for (int64_t m = 0; m < rows; ++m) {
          // sum * x_scale * w_scale (+ bias), 16 outputs at a time where the block is whole.
          if (count == kBlock) {
            const __m512i shifted = _mm512_sub_epi32(_mm512_loadu_si512(sums.data() + m * kBlock),
                                                     _mm512_mullo_epi32(_mm512_loadu_si512(w_sum + n0), _mm512_set1_epi32(kShift)));
            __m512 value = _mm512_mul_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(shifted), _mm512_set1_ps(x_scale[m])),
                                         _mm512_loadu_ps(w_scale + n0));
            if (b != nullptr) value = _mm512_add_ps(value, _mm512_loadu_ps(b + n0));
            store16(y + m * out_features + n0, value);
            continue;
          }
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
      for (int64_t m = first; m < last; ++m) scale[m] = quantize_row<0>(in + m * cols, cols, out + m * cols);
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

// A LoRA adapter's contribution for a few rows, added into `result` in place: result +=
// ((x @ a.T) @ b.T * scaling) rounded to result's dtype, both products in float32 as PEFT computes
// them (x is first converted to float32), each streaming its float32 factor once. x (M, K);
// a (r, K) and b (N, r) float32 contiguous; result (M, N) contiguous.
void lora_add(torch::Tensor& result, const torch::Tensor& x, const torch::Tensor& a, const torch::Tensor& b,
              double scaling) {
  TORCH_CHECK(a.scalar_type() == torch::kFloat && a.dim() == 2 && a.is_contiguous(), "a must be a contiguous float (r, K)");
  TORCH_CHECK(b.scalar_type() == torch::kFloat && b.dim() == 2 && b.is_contiguous(), "b must be a contiguous float (N, r)");
  const int64_t rank = a.size(0), in_features = a.size(1), out_features = b.size(0);
  TORCH_CHECK(x.size(-1) == in_features, "input has ", x.size(-1), " features, the adapter ", in_features);
  TORCH_CHECK(b.size(1) == rank, "b has ", b.size(1), " columns for a rank of ", rank);
  const auto rows_in = x.reshape({-1, in_features}).to(torch::kFloat).contiguous();
  const int64_t rows = rows_in.size(0);
  TORCH_CHECK(result.is_contiguous() && result.numel() == rows * out_features, "result must be a contiguous (M, N)");
  auto low = torch::empty({rows, rank}, torch::kFloat);
  float_rows_times(rows_in.data_ptr<float>(), rows, a.data_ptr<float>(), rank, in_features, low.data_ptr<float>());
  AT_DISPATCH_FLOATING_TYPES_AND2(torch::kBFloat16, torch::kHalf, result.scalar_type(), "lora_add", [&] {
    add_low_rank(low.data_ptr<float>(), rows, b.data_ptr<float>(), out_features, rank, static_cast<float>(scaling),
                 result.data_ptr<scalar_t>());
  });
}

// One new token per row through a GPT-NeoX attention block, between its two projections: split
// the fused qkv (B, heads * 3 * D), rotate the query and key, store the key and value at `column`
// of the caches (B, heads, capacity, D), and attend over the positions `attends` (B, capacity)
// marks, `column` included. Softmax and sums in float32; returns (B, heads * D) in qkv's dtype.
// This is what `apply_rotary_pos_emb`, the cache update and `scaled_dot_product_attention` do in
// the HF forward, in one call instead of about twenty operators per layer.
torch::Tensor attend_one(const torch::Tensor& qkv, const torch::Tensor& cos, const torch::Tensor& sin,
                         torch::Tensor& keys, torch::Tensor& values, int64_t column, const torch::Tensor& attends,
                         double scaling) {
  TORCH_CHECK(keys.dim() == 4 && keys.is_contiguous() && values.is_contiguous() && keys.sizes() == values.sizes(),
              "keys and values must be contiguous (B, heads, capacity, D) caches of one shape");
  const int64_t batch = keys.size(0), heads = keys.size(1), capacity = keys.size(2), dims = keys.size(3);
  const int64_t rotary = cos.size(-1);
  TORCH_CHECK(dims % 16 == 0, "head size ", dims, " is not a multiple of 16");
  TORCH_CHECK(qkv.is_contiguous() && qkv.numel() == batch * heads * 3 * dims, "qkv must be a contiguous (B, heads * 3 * D)");
  TORCH_CHECK(qkv.scalar_type() == keys.scalar_type() && keys.scalar_type() == values.scalar_type() &&
                  cos.scalar_type() == qkv.scalar_type() && sin.scalar_type() == qkv.scalar_type(),
              "qkv, caches and angles must share a dtype");
  TORCH_CHECK(cos.is_contiguous() && sin.is_contiguous() && cos.numel() == batch * rotary && sin.numel() == batch * rotary,
              "cos and sin must be contiguous (B, rotary)");
  TORCH_CHECK(rotary % 2 == 0 && rotary <= dims, "rotary dimensions must be even and at most the head size");
  TORCH_CHECK(attends.scalar_type() == torch::kBool && attends.is_contiguous() && attends.size(0) == batch &&
                  attends.size(1) == capacity,
              "attends must be a contiguous (B, capacity) bool mask");
  TORCH_CHECK(0 <= column && column < capacity, "column ", column, " is outside the cache of ", capacity);
  auto output = torch::empty({batch, heads * dims}, qkv.options());
  const bool* mask = attends.data_ptr<bool>();

  AT_DISPATCH_FLOATING_TYPES_AND2(torch::kBFloat16, torch::kHalf, qkv.scalar_type(), "attend_one", [&] {
    const scalar_t* fused = qkv.data_ptr<scalar_t>();
    const scalar_t* cos_rows = cos.data_ptr<scalar_t>();
    const scalar_t* sin_rows = sin.data_ptr<scalar_t>();
    scalar_t* key_cache = keys.data_ptr<scalar_t>();
    scalar_t* value_cache = values.data_ptr<scalar_t>();
    scalar_t* out = output.data_ptr<scalar_t>();
    at::parallel_for(0, batch * heads, 1, [&](int64_t first, int64_t last) {
      std::vector<scalar_t> query(dims);
      std::vector<float> weights(column + 1), sums(dims);
      for (int64_t task = first; task < last; ++task) {
        const int64_t b = task / heads, h = task % heads;
        const scalar_t* head = fused + (b * heads + h) * 3 * dims;
        const scalar_t* angle_cos = cos_rows + b * rotary;
        const scalar_t* angle_sin = sin_rows + b * rotary;
        scalar_t* head_keys = key_cache + (b * heads + h) * capacity * dims;
        scalar_t* head_values = value_cache + (b * heads + h) * capacity * dims;
        rotate(head, angle_cos, angle_sin, rotary, dims, query.data());
        rotate(head + dims, angle_cos, angle_sin, rotary, dims, head_keys + column * dims);
        std::copy(head + 2 * dims, head + 3 * dims, head_values + column * dims);

        const bool* row_mask = mask + b * capacity;
        float largest = -std::numeric_limits<float>::infinity();
        for (int64_t j = 0; j <= column; ++j) {
          if (!row_mask[j]) continue;
          __m512 acc = _mm512_setzero_ps();
          for (int64_t d = 0; d < dims; d += 16)
            acc = _mm512_fmadd_ps(load16(query.data() + d), load16(head_keys + j * dims + d), acc);
          weights[j] = _mm512_reduce_add_ps(acc) * static_cast<float>(scaling);
          largest = std::max(largest, weights[j]);
        }
        float total = 0.f;
        std::fill(sums.begin(), sums.end(), 0.f);
        for (int64_t j = 0; j <= column; ++j) {
          if (!row_mask[j]) continue;
          const float weight = std::exp(weights[j] - largest);
          total += weight;
          const __m512 w = _mm512_set1_ps(weight);
          for (int64_t d = 0; d < dims; d += 16)
            _mm512_storeu_ps(sums.data() + d, _mm512_fmadd_ps(w, load16(head_values + j * dims + d), _mm512_loadu_ps(sums.data() + d)));
        }
        scalar_t* target = out + b * heads * dims + h * dims;
        for (int64_t d = 0; d < dims; ++d) target[d] = static_cast<scalar_t>(sums[d] / total);
      }
    });
  });
  return output;
}

namespace {

// e^x for 16 lanes, within about an ulp: 2^n * e^r with |r| <= ln(2) / 2 and a degree-7 polynomial.
inline __m512 exp16(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-104.f)), _mm512_set1_ps(88.7f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187e-6f), r);
  __m512 p = _mm512_set1_ps(1.f / 5040.f);
  for (const float c : {1.f / 720.f, 1.f / 120.f, 1.f / 24.f, 1.f / 6.f, 0.5f, 1.f, 1.f}) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
  return _mm512_scalef_ps(p, n);
}

// The exact (erf) GELU, x / 2 * (1 + erf(x / sqrt 2)), in ATen's form: erf from Abramowitz and
// Stegun 7.1.26 (absolute error under 1.5e-7), sign(a) * (1 - t * poly(t) * e^(-a^2)), then
// 1 + erf, which rounds values below about -5.5 to -0 as ATen's does. The results differ from
// ATen's by a few float32 ulps, far below the int8 step of the next layer's quantised input.
inline __m512 gelu16(__m512 x) {
  const __m512 a = _mm512_mul_ps(x, _mm512_set1_ps(0.70710678118654752f));
  const __m512 size = _mm512_abs_ps(a);
  const __m512 t = _mm512_div_ps(_mm512_set1_ps(1.f), _mm512_fmadd_ps(_mm512_set1_ps(0.3275911f), size, _mm512_set1_ps(1.f)));
  __m512 poly = _mm512_set1_ps(1.061405429f);
  for (const float c : {-1.453152027f, 1.421413741f, -0.284496736f, 0.254829592f}) poly = _mm512_fmadd_ps(poly, t, _mm512_set1_ps(c));
  const __m512 tail = _mm512_mul_ps(_mm512_mul_ps(exp16(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_mul_ps(a, a))), t), poly);
  const __m512 magnitude = _mm512_sub_ps(_mm512_set1_ps(1.f), tail);
  const __m512i sign = _mm512_and_si512(_mm512_castps_si512(a), _mm512_set1_epi32(INT32_MIN));
  const __m512 erf = _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(magnitude), sign));
  return _mm512_mul_ps(_mm512_mul_ps(x, _mm512_set1_ps(0.5f)), _mm512_add_ps(_mm512_set1_ps(1.f), erf));
}

// out[i] = f(in[i]) over n values, 16 at a time in float32, rounded once to the dtype.
template <typename scalar_t, typename F>
void map16(const scalar_t* in, scalar_t* out, int64_t n, F f) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) store16(out + i, f(load16(in + i), i));
  if (i < n) store_tail(out + i, f(load_tail(in + i, n - i), i), n - i);
}

}  // namespace

// x (..., N) -> gelu(x), exact form, in x's dtype. ATen's `gelu` on a decode step's 8,192 values
// took 50-80 us a layer; this takes a few.
torch::Tensor exact_gelu(const torch::Tensor& x) {
  if (x.scalar_type() == torch::kDouble) return at::gelu(x);  // our lanes are float32
  const auto input = x.contiguous();
  auto output = torch::empty_like(input);
  AT_DISPATCH_FLOATING_TYPES_AND2(torch::kBFloat16, torch::kHalf, x.scalar_type(), "gelu", [&] {
    map16(input.data_ptr<scalar_t>(), output.data_ptr<scalar_t>(), input.numel(), [](__m512 v, int64_t) { return gelu16(v); });
  });
  return output;
}

// Layer norm of each row of x (..., W) with weight and bias (W,) of x's dtype: statistics in
// float32 (mean, then the mean squared deviation), one rounding to the dtype, as ATen does.
torch::Tensor norm_rows(const torch::Tensor& x, const torch::Tensor& weight, const torch::Tensor& bias, double eps) {
  const int64_t width = x.size(-1);
  TORCH_CHECK(weight.numel() == width && bias.numel() == width && weight.is_contiguous() && bias.is_contiguous(),
              "weight and bias must be contiguous, one value per feature");
  TORCH_CHECK(weight.scalar_type() == x.scalar_type() && bias.scalar_type() == x.scalar_type(),
              "weight and bias must have the input's dtype");
  if (x.scalar_type() == torch::kDouble) return at::layer_norm(x, {width}, weight, bias, eps);  // float32 lanes
  const auto input = x.contiguous();
  auto output = torch::empty_like(input);
  const int64_t rows = input.numel() / width;
  AT_DISPATCH_FLOATING_TYPES_AND2(torch::kBFloat16, torch::kHalf, x.scalar_type(), "layer_norm", [&] {
    const scalar_t* w = weight.data_ptr<scalar_t>();
    const scalar_t* b = bias.data_ptr<scalar_t>();
    for (int64_t m = 0; m < rows; ++m) {
      const scalar_t* row = input.data_ptr<scalar_t>() + m * width;
      scalar_t* out = output.data_ptr<scalar_t>() + m * width;
      const auto sum = [&](auto term) {
        __m512 acc = _mm512_setzero_ps();
        int64_t k = 0;
        for (; k + 16 <= width; k += 16) acc = _mm512_add_ps(acc, term(load16(row + k)));
        if (k < width) acc = _mm512_add_ps(acc, _mm512_maskz_mov_ps((1u << (width - k)) - 1, term(load_tail(row + k, width - k))));
        return _mm512_reduce_add_ps(acc);
      };
      const float mean = sum([](__m512 v) { return v; }) / static_cast<float>(width);
      const __m512 centre = _mm512_set1_ps(mean);
      const float variance = sum([&](__m512 v) {
        const __m512 d = _mm512_sub_ps(v, centre);
        return _mm512_mul_ps(d, d);
      }) / static_cast<float>(width);
      const __m512 scale = _mm512_set1_ps(1.f / std::sqrt(variance + static_cast<float>(eps)));
      map16(row, out, width, [&](__m512 v, int64_t k) {
        const bool whole = k + 16 <= width;
        const __m512 g = whole ? load16(w + k) : load_tail(w + k, width - k);
        const __m512 h = whole ? load16(b + k) : load_tail(b + k, width - k);
        return _mm512_add_ps(_mm512_mul_ps(_mm512_mul_ps(_mm512_sub_ps(v, centre), scale), g), h);
      });
    }
  });
  return output;
}

namespace {

// a + b, rounded to the dtype, as ATen's `add` rounds.
torch::Tensor sum_of(const torch::Tensor& a, const torch::Tensor& b) {
  TORCH_CHECK(a.is_contiguous() && b.is_contiguous() && a.numel() == b.numel() && a.scalar_type() == b.scalar_type(),
              "add: two contiguous tensors of one size and dtype");
  auto output = torch::empty_like(a);
  AT_DISPATCH_FLOATING_TYPES_AND2(torch::kBFloat16, torch::kHalf, a.scalar_type(), "add", [&] {
    const scalar_t* other = b.data_ptr<scalar_t>();
    const int64_t n = a.numel();
    map16(a.data_ptr<scalar_t>(), output.data_ptr<scalar_t>(), n, [&](__m512 v, int64_t i) {
      return _mm512_add_ps(v, i + 16 <= n ? load16(other + i) : load_tail(other + i, n - i));
    });
  });
  return output;
}

struct Adapter {
  torch::Tensor a, b;
  double scaling;
};

}  // namespace

// A GPT-NeoX layer whose four projections are our int8 layers, for one new token per row, as
// `_Layer` in models/neox_step.py runs it: our layer norms, int8 and LoRA products, attention
// and GELU, with the additions in the same order, without returning to Python between its
// parts (a layer was about 45 Python-level calls).
class NeoXLayer {
 public:
  // norms: the two layer norms' weights and biases; linears: four (weight, scales, row sums,
  // bias) groups: query_key_value, dense, dense_h_to_4h, dense_4h_to_h. More than
  // `max_kernel_rows` rows go to `_int_mm`, as `VnniInt8Linear.forward` sends them.
  NeoXLayer(std::vector<torch::Tensor> norms, double eps, std::vector<torch::Tensor> linears, double scaling,
            bool parallel_residual, int64_t max_kernel_rows)
      : norms_(std::move(norms)), eps_(eps), linears_(std::move(linears)), scaling_(scaling),
        parallel_residual_(parallel_residual), max_kernel_rows_(max_kernel_rows) {
    TORCH_CHECK(norms_.size() == 4 && linears_.size() == 16, "4 layer-norm tensors and 4 linear groups");
  }

  // A LoRA adapter on projection `target`, used for the rows that name it.
  void add_adapter(const std::string& name, int64_t target, torch::Tensor a, torch::Tensor b, double scaling) {
    TORCH_CHECK(0 <= target && target < 4, "target must name one of the four projections");
    adapters_[target].insert_or_assign(name, Adapter{std::move(a), std::move(b), scaling});
  }

  // groups: each adapter named in the batch with its rows (empty: every row).
  torch::Tensor forward(const torch::Tensor& hidden, const std::vector<std::tuple<std::string, torch::Tensor>>& groups,
                        const torch::Tensor& cos, const torch::Tensor& sin, torch::Tensor& keys, torch::Tensor& values,
                        int64_t column, const torch::Tensor& attends) const {
    const int64_t rows = hidden.size(0);
    const auto qkv = project(norm_rows(hidden, norms_[0], norms_[1], eps_), 0, groups);
    const auto attended = attend_one(qkv.view({rows, -1}), cos, sin, keys, values, column, attends, scaling_);
    const auto attention = project(attended.view(hidden.sizes()), 1, groups);
    const auto mlp = [&](const torch::Tensor& x) { return project(exact_gelu(project(x, 2, groups)), 3, groups); };
    if (parallel_residual_) return sum_of(sum_of(mlp(norm_rows(hidden, norms_[2], norms_[3], eps_)), attention), hidden);
    const auto residual = sum_of(attention, hidden);
    return sum_of(mlp(norm_rows(residual, norms_[2], norms_[3], eps_)), residual);
  }

 private:
  // A projection on our int8 kernel, plus the LoRA updates of the adapters on it.
  torch::Tensor project(const torch::Tensor& x, int64_t which,
                        const std::vector<std::tuple<std::string, torch::Tensor>>& groups) const {
    const auto& weight = linears_[4 * which];
    const auto& scales = linears_[4 * which + 1];
    const auto& bias = linears_[4 * which + 3];
    torch::Tensor result;
    if (x.numel() <= max_kernel_rows_ * x.size(-1)) {
      result = int8_linear(x, weight, scales, linears_[4 * which + 2], bias);
    } else {
      const auto [quantized, row_scales] = quantize_rows_signed(x);
      auto shape = x.sizes().vec();
      shape.back() = weight.size(0);
      result = scale_products(at::_int_mm(quantized, weight.t()), row_scales, scales, bias, x.scalar_type()).view(shape);
    }
    for (const auto& [name, rows] : groups) {
      const auto found = adapters_[which].find(name);
      if (found == adapters_[which].end()) continue;
      const Adapter& adapter = found->second;
      if (rows.numel() == 0) {
        lora_add(result, x, adapter.a, adapter.b, adapter.scaling);
      } else {
        auto picked = result.index_select(0, rows);
        lora_add(picked, x.index_select(0, rows), adapter.a, adapter.b, adapter.scaling);
        result.index_copy_(0, rows, picked);
      }
    }
    return result;
  }

  std::vector<torch::Tensor> norms_;
  double eps_;
  std::vector<torch::Tensor> linears_;
  double scaling_;
  bool parallel_residual_;
  int64_t max_kernel_rows_;
  std::array<std::map<std::string, Adapter>, 4> adapters_;  // per projection, by adapter name
};

// Every layer of a model in turn, for one step: hidden (B, 1, W) in, the last layer's output out.
torch::Tensor decode_layers(const std::vector<std::shared_ptr<NeoXLayer>>& layers, torch::Tensor hidden,
                            const std::vector<std::tuple<std::string, torch::Tensor>>& groups, const torch::Tensor& cos,
                            const torch::Tensor& sin, std::vector<torch::Tensor> keys, std::vector<torch::Tensor> values,
                            int64_t column, const torch::Tensor& attends) {
  TORCH_CHECK(keys.size() == layers.size() && values.size() == layers.size(), "one key and value cache per layer");
  for (size_t i = 0; i < layers.size(); ++i) hidden = layers[i]->forward(hidden, groups, cos, sin, keys[i], values[i], column, attends);
  return hidden;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.def("int8_linear", &int8_linear, "x @ dequantised(weight).T + bias, for a few rows of x");
  module.def("quantize_rows_signed", &quantize_rows_signed, "int8 rows and one scale per row");
  module.def("lora_add", &lora_add, "a LoRA adapter's update, computed in float32, added into result");
  module.def("attend_one", &attend_one, "rotary, cache update and attention for one new token per row");
  module.def("gelu", &exact_gelu, "the exact GELU");
  module.def("layer_norm", &norm_rows, "layer norm over the last dimension");
  pybind11::class_<NeoXLayer, std::shared_ptr<NeoXLayer>>(module, "NeoXLayer", pybind11::module_local())
      .def(pybind11::init<std::vector<torch::Tensor>, double, std::vector<torch::Tensor>, double, bool, int64_t>())
      .def("add_adapter", &NeoXLayer::add_adapter);
  module.def("decode_layers", &decode_layers, "every GPT-NeoX layer of a model for one new token per row");
  module.def("scale_products", &scale_products, "int32 products scaled back to floats, plus bias");
}
