// Products of a few fp32 rows with weights kept as GGUF-style blocks of 32 inputs.
//
// Q4_1 blocks: w = q * d + m, q in 0..15 packed two per byte (byte j of a block holds
// q[j] in its low nibble and q[j + 16] in its high one), d and m fp16.
// Q8_0 blocks: w = q * d, q int8, d fp16.
//
// Each weight is rebuilt in fp32 exactly as the dequantised fp32 tensor holds it (q * d
// is exact in fp32, and one rounding of + m matches ``q * d + m`` computed in fp32), so
// the result differs from ``x @ W.T`` only in the order of the fp32 sums. What changes is
// the bytes read per weight: 0.625 (Q4_1) or 1.06 (Q8_0) instead of 4.

#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/extension.h>

#include <cstdint>

namespace {

constexpr int64_t kBlock = 32;
constexpr int64_t kGrain = 16;

inline float half_to_float(uint16_t bits) { return _cvtsh_ss(bits); }

inline float horizontal_sum(__m256 v) {
  __m128 low = _mm256_castps256_ps128(v);
  __m128 high = _mm256_extractf128_ps(v, 1);
  __m128 sum = _mm_add_ps(low, high);
  sum = _mm_add_ps(sum, _mm_movehl_ps(sum, sum));
  sum = _mm_add_ss(sum, _mm_movehdup_ps(sum));
  return _mm_cvtss_f32(sum);
}

inline __m256 bytes_to_float(__m128i bytes) {
  return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(bytes));
}

inline __m256 signed_bytes_to_float(__m128i bytes) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes));
}

// The four groups of eight weights of one block, in input order.
struct BlockWeights {
  __m256 w[4];
};

inline BlockWeights q4_1_block(const uint8_t* codes, uint16_t scale, uint16_t minimum) {
  const __m256 d = _mm256_set1_ps(half_to_float(scale));
  const __m256 m = _mm256_set1_ps(half_to_float(minimum));
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(codes));
  const __m128i mask = _mm_set1_epi8(0x0F);
  const __m128i low = _mm_and_si128(raw, mask);
  const __m128i high = _mm_and_si128(_mm_srli_epi16(raw, 4), mask);
  BlockWeights out;
  out.w[0] = _mm256_fmadd_ps(bytes_to_float(low), d, m);
  out.w[1] = _mm256_fmadd_ps(bytes_to_float(_mm_srli_si128(low, 8)), d, m);
  out.w[2] = _mm256_fmadd_ps(bytes_to_float(high), d, m);
  out.w[3] = _mm256_fmadd_ps(bytes_to_float(_mm_srli_si128(high, 8)), d, m);
  return out;
}

inline BlockWeights q8_0_block(const int8_t* codes, uint16_t scale) {
  const __m256 d = _mm256_set1_ps(half_to_float(scale));
  const __m128i first = _mm_loadu_si128(reinterpret_cast<const __m128i*>(codes));
  const __m128i second = _mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + 16));
  BlockWeights out;
  out.w[0] = _mm256_mul_ps(signed_bytes_to_float(first), d);
  out.w[1] = _mm256_mul_ps(signed_bytes_to_float(_mm_srli_si128(first, 8)), d);
  out.w[2] = _mm256_mul_ps(signed_bytes_to_float(second), d);
  out.w[3] = _mm256_mul_ps(signed_bytes_to_float(_mm_srli_si128(second, 8)), d);
  return out;
}

// out[r, n] for the R rows of x from ``row`` on: each block's weights are rebuilt once
// and used for every row. Up to four rows keep two accumulators a row (short FMA chains);
// more rows keep one each, so that all of them stay in the sixteen vector registers.
template <int R, typename MakeBlock>
inline void dot_rows(const float* x, int64_t in_features, int64_t row, int64_t blocks,
                     MakeBlock make_block, float* out, int64_t n, int64_t out_features) {
  constexpr int kAcc = R <= 4 ? 2 : 1;
  __m256 acc[R][kAcc];
  for (int r = 0; r < R; ++r)
    for (int a = 0; a < kAcc; ++a) acc[r][a] = _mm256_setzero_ps();
  const float* x0 = x + row * in_features;
  for (int64_t b = 0; b < blocks; ++b) {
    const BlockWeights weights = make_block(b);
    for (int r = 0; r < R; ++r) {
      const float* xb = x0 + r * in_features + b * kBlock;
      for (int g = 0; g < 4; ++g)
        acc[r][g % kAcc] =
            _mm256_fmadd_ps(weights.w[g], _mm256_loadu_ps(xb + 8 * g), acc[r][g % kAcc]);
    }
  }
  for (int r = 0; r < R; ++r) {
    __m256 sum = acc[r][0];
    if constexpr (kAcc == 2) sum = _mm256_add_ps(sum, acc[r][kAcc - 1]);
    out[(row + r) * out_features + n] = horizontal_sum(sum);
  }
}

template <int R, typename MakeBlock>
inline void dot_tail(const float* x, int64_t in_features, int64_t row, int64_t left,
                     int64_t blocks, MakeBlock make_block, float* out, int64_t n,
                     int64_t out_features) {
  if constexpr (R > 0) {
    if (left == R)
      dot_rows<R>(x, in_features, row, blocks, make_block, out, n, out_features);
    else
      dot_tail<R - 1>(x, in_features, row, left, blocks, make_block, out, n, out_features);
  }
}

// All rows of x against output n, up to eight rows per pass over the weights.
template <typename MakeBlock>
inline void dot_all_rows(const float* x, int64_t rows, int64_t in_features, int64_t blocks,
                         MakeBlock make_block, float* out, int64_t n, int64_t out_features) {
  int64_t row = 0;
  for (; row + 8 <= rows; row += 8)
    dot_rows<8>(x, in_features, row, blocks, make_block, out, n, out_features);
  dot_tail<7>(x, in_features, row, rows - row, blocks, make_block, out, n, out_features);
}

void check_input(const torch::Tensor& x, int64_t in_features) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == torch::kFloat32 && x.dim() == 2,
              "block products take a 2-D float32 CPU input");
  TORCH_CHECK(x.is_contiguous(), "block products take a contiguous input");
  TORCH_CHECK(x.size(1) == in_features, "input has ", x.size(1), " features, weights take ",
              in_features);
}

}  // namespace

// out [M, N] = x [M, K] times the weights whose block b of output n is
// ``block_of_output(n)(b)``, output rows split over torch's threads.
template <typename BlockOfOutput>
torch::Tensor blocks_product(const torch::Tensor& x, int64_t out_features, int64_t in_features,
                             BlockOfOutput block_of_output) {
  check_input(x, in_features);
  const int64_t rows = x.size(0);
  const int64_t blocks = in_features / kBlock;
  auto out = torch::empty({rows, out_features}, x.options());
  const float* xp = x.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, out_features, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n)
      dot_all_rows(xp, rows, in_features, blocks, block_of_output(n), op, n, out_features);
  });
  return out;
}

// x [M, K] fp32; codes [N, K / 2] uint8; scales, minimums [N, K / 32] fp16 -> [M, N] fp32.
torch::Tensor q4_1_matmul(torch::Tensor x, torch::Tensor codes, torch::Tensor scales,
                          torch::Tensor minimums) {
  TORCH_CHECK(codes.scalar_type() == torch::kUInt8 && codes.is_contiguous(), "codes: uint8");
  TORCH_CHECK(scales.scalar_type() == torch::kFloat16 && scales.is_contiguous() &&
                  minimums.scalar_type() == torch::kFloat16 && minimums.is_contiguous(),
              "scales and minimums: contiguous float16");
  const int64_t in_features = codes.size(1) * 2;
  const int64_t blocks = in_features / kBlock;
  const uint8_t* cp = codes.data_ptr<uint8_t>();
  const auto* sp = reinterpret_cast<const uint16_t*>(scales.data_ptr<at::Half>());
  const auto* mp = reinterpret_cast<const uint16_t*>(minimums.data_ptr<at::Half>());
  return blocks_product(x, codes.size(0), in_features, [=](int64_t n) {
    return [=](int64_t b) {
      const int64_t block = n * blocks + b;
      return q4_1_block(cp + block * (kBlock / 2), sp[block], mp[block]);
    };
  });
}

// x [M, K] fp32; codes [N, K] int8; scales [N, K / 32] fp16 -> [M, N] fp32.
torch::Tensor q8_0_matmul(torch::Tensor x, torch::Tensor codes, torch::Tensor scales) {
  TORCH_CHECK(codes.scalar_type() == torch::kInt8 && codes.is_contiguous(), "codes: int8");
  TORCH_CHECK(scales.scalar_type() == torch::kFloat16 && scales.is_contiguous(),
              "scales: contiguous float16");
  const int64_t in_features = codes.size(1);
  const int64_t blocks = in_features / kBlock;
  const int8_t* cp = codes.data_ptr<int8_t>();
  const auto* sp = reinterpret_cast<const uint16_t*>(scales.data_ptr<at::Half>());
  return blocks_product(x, codes.size(0), in_features, [=](int64_t n) {
    return [=](int64_t b) {
      const int64_t block = n * blocks + b;
      return q8_0_block(cp + block * kBlock, sp[block]);
    };
  });
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("q4_1_matmul", &q4_1_matmul, "x @ W.T with W in Q4_1 blocks");
  m.def("q8_0_matmul", &q8_0_matmul, "x @ W.T with W in Q8_0 blocks");
}
