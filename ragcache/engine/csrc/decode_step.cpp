// A whole decoder forward of a few tokens in one call: every layer's RMSNorm, q/k/v
// product, RoPE, KV write into the paged pool, attention over each token's block table,
// output product, SwiGLU MLP and residual sums, with the projections read from GGUF
// Q4_1 / Q8_0 blocks.
//
// Python would issue about a dozen torch calls a layer for this; for a 135M model at one
// token that per-call cost is most of a decode step. Weights are rebuilt in fp32 exactly
// as the dequantised tensors hold them (q * d + m, q * d) before fp32 products, so results
// differ from the torch path only in the order of fp32 sums and in exp's last bits.
//
// It includes no torch header (it compiles in seconds) and exposes plain C functions
// over raw pointers; ``fused_decode.py`` checks every shape before calling.

#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace {

constexpr int64_t kBlock = 32;

inline float half_to_float(uint16_t bits) { return _cvtsh_ss(bits); }

inline float horizontal_sum(__m256 v) {
  __m128 low = _mm256_castps256_ps128(v);
  __m128 high = _mm256_extractf128_ps(v, 1);
  __m128 sum = _mm_add_ps(low, high);
  sum = _mm_add_ps(sum, _mm_movehl_ps(sum, sum));
  sum = _mm_add_ss(sum, _mm_movehdup_ps(sum));
  return _mm_cvtss_f32(sum);
}

// exp(x) for fp32 lanes: 2^n * p(r) with r = x - n ln2, a degree-6 polynomial (relative
// error about 2 ulp), inputs clamped to the finite range.
inline __m256 exp_ps(__m256 x) {
  const __m256 max_x = _mm256_set1_ps(88.3762626647949f);
  const __m256 min_x = _mm256_set1_ps(-87.3365447504f);
  x = _mm256_max_ps(_mm256_min_ps(x, max_x), min_x);
  const __m256 log2e = _mm256_set1_ps(1.44269504088896341f);
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, log2e),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 ln2_hi = _mm256_set1_ps(0.693359375f);
  const __m256 ln2_lo = _mm256_set1_ps(-2.12194440e-4f);
  __m256 r = _mm256_fnmadd_ps(n, ln2_hi, x);
  r = _mm256_fnmadd_ps(n, ln2_lo, r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r);
  p = _mm256_add_ps(p, _mm256_set1_ps(1.0f));
  const __m256i bits = _mm256_slli_epi32(
      _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
}

// ---- block weights ------------------------------------------------------------------

struct BlockWeights {
  __m256 w[4];
};

inline __m256 bytes_to_float(__m128i bytes) {
  return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(bytes));
}

inline __m256 signed_bytes_to_float(__m128i bytes) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes));
}

// One matrix [N, K] of Q4_1 (codes two a byte, scales and minimums fp16) or Q8_0 blocks.
struct BlockMatrix {
  bool q4 = true;
  int64_t rows = 0;
  int64_t cols = 0;
  const uint8_t* codes = nullptr;
  const uint16_t* scales = nullptr;
  const uint16_t* minimums = nullptr;

  inline BlockWeights block(int64_t n, int64_t b) const {
    const int64_t index = n * (cols / kBlock) + b;
    const __m256 d = _mm256_set1_ps(half_to_float(scales[index]));
    BlockWeights out;
    if (q4) {
      const __m256 m = _mm256_set1_ps(half_to_float(minimums[index]));
      const __m128i raw =
          _mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + index * (kBlock / 2)));
      const __m128i mask = _mm_set1_epi8(0x0F);
      const __m128i low = _mm_and_si128(raw, mask);
      const __m128i high = _mm_and_si128(_mm_srli_epi16(raw, 4), mask);
      out.w[0] = _mm256_fmadd_ps(bytes_to_float(low), d, m);
      out.w[1] = _mm256_fmadd_ps(bytes_to_float(_mm_srli_si128(low, 8)), d, m);
      out.w[2] = _mm256_fmadd_ps(bytes_to_float(high), d, m);
      out.w[3] = _mm256_fmadd_ps(bytes_to_float(_mm_srli_si128(high, 8)), d, m);
    } else {
      const uint8_t* base = codes + index * kBlock;
      const __m128i first = _mm_loadu_si128(reinterpret_cast<const __m128i*>(base));
      const __m128i second = _mm_loadu_si128(reinterpret_cast<const __m128i*>(base + 16));
      out.w[0] = _mm256_mul_ps(signed_bytes_to_float(first), d);
      out.w[1] = _mm256_mul_ps(signed_bytes_to_float(_mm_srli_si128(first, 8)), d);
      out.w[2] = _mm256_mul_ps(signed_bytes_to_float(second), d);
      out.w[3] = _mm256_mul_ps(signed_bytes_to_float(_mm_srli_si128(second, 8)), d);
    }
    return out;
  }
};

// out[r, n] = sum_k x[r, k] W[n, k] for R rows from ``row`` and outputs n0 .. n0 + O - 1.
// Each block is rebuilt once and used for every row; O outputs in flight keep enough
// independent FMA chains when R is small.
template <int R, int O>
inline void dot_tile(const BlockMatrix& w, const float* x, int64_t row, int64_t n0, float* out,
                     int64_t out_stride) {
  __m256 acc[R][O];
  for (int r = 0; r < R; ++r)
    for (int o = 0; o < O; ++o) acc[r][o] = _mm256_setzero_ps();
  const int64_t blocks = w.cols / kBlock;
  const float* x0 = x + row * w.cols;
  for (int64_t b = 0; b < blocks; ++b) {
    for (int o = 0; o < O; ++o) {
      const BlockWeights weights = w.block(n0 + o, b);
      for (int r = 0; r < R; ++r) {
        const float* xb = x0 + r * w.cols + b * kBlock;
        for (int g = 0; g < 4; ++g)
          acc[r][o] = _mm256_fmadd_ps(weights.w[g], _mm256_loadu_ps(xb + 8 * g), acc[r][o]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int o = 0; o < O; ++o) out[(row + r) * out_stride + n0 + o] = horizontal_sum(acc[r][o]);
}

template <int R>
inline void dot_outputs(const BlockMatrix& w, const float* x, int64_t row, int64_t begin,
                        int64_t end, float* out, int64_t stride) {
  constexpr int O = R == 1 ? 4 : (R == 2 ? 2 : 1);
  int64_t n = begin;
  for (; n + O <= end; n += O) dot_tile<R, O>(w, x, row, n, out, stride);
  for (; n < end; ++n) dot_tile<R, 1>(w, x, row, n, out, stride);
}

template <int R>
inline void dot_rows_tail(const BlockMatrix& w, const float* x, int64_t row, int64_t left,
                          int64_t begin, int64_t end, float* out, int64_t stride) {
  if constexpr (R > 0) {
    if (left == R)
      dot_outputs<R>(w, x, row, begin, end, out, stride);
    else
      dot_rows_tail<R - 1>(w, x, row, left, begin, end, out, stride);
  }
}

// out [T, N] = x [T, K] @ W.T, outputs split over torch's threads.
// Called inside a parallel region: each thread takes one contiguous share of outputs.
void block_product(const BlockMatrix& w, const float* x, int64_t tokens, float* out) {
  const int64_t threads = omp_get_num_threads();
  const int64_t share = (w.rows / threads + 3) / 4 * 4;
  const int64_t begin = std::min<int64_t>(w.rows, omp_get_thread_num() * share);
  const int64_t end = omp_get_thread_num() == threads - 1 ? w.rows
                                                          : std::min<int64_t>(w.rows, begin + share);
  int64_t row = 0;
  for (; row + 8 <= tokens; row += 8) dot_outputs<8>(w, x, row, begin, end, out, w.rows);
  dot_rows_tail<7>(w, x, row, tokens - row, begin, end, out, w.rows);
#pragma omp barrier
}

// ---- element-wise parts -------------------------------------------------------------

void rms_norm(const float* x, const float* weight, float eps, int64_t tokens, int64_t size,
              float* out) {
  for (int64_t t = 0; t < tokens; ++t) {
    const float* row = x + t * size;
    double squares = 0.0;
    for (int64_t i = 0; i < size; ++i) squares += static_cast<double>(row[i]) * row[i];
    const float inv = 1.0f / std::sqrt(static_cast<float>(squares / size) + eps);
    for (int64_t i = 0; i < size; ++i) out[t * size + i] = row[i] * inv * weight[i];
  }
}

// x [heads, D] of one token rotated in place: x * cos + rotate_half(x) * signed sin.
void rotate(float* x, int64_t heads, int64_t head_dim, const float* cos_full,
            const float* sin_signed) {
  const int64_t half = head_dim / 2;
  std::vector<float> rotated(head_dim);
  for (int64_t h = 0; h < heads; ++h) {
    float* v = x + h * head_dim;
    for (int64_t i = 0; i < head_dim; ++i) rotated[i] = v[(i + half) % head_dim];
    for (int64_t i = 0; i < head_dim; ++i) {
      const float a = rotated[i] * sin_signed[i];
      const float b = v[i] * cos_full[i];
      v[i] = a + b;
    }
  }
}

void silu_times(const float* gate_up, int64_t tokens, int64_t inter, float* out) {
  for (int64_t t = 0; t < tokens; ++t) {
    const float* gate = gate_up + t * 2 * inter;
    const float* up = gate + inter;
    float* o = out + t * inter;
    int64_t i = 0;
    const __m256 one = _mm256_set1_ps(1.0f);
    for (; i + 8 <= inter; i += 8) {
      const __m256 g = _mm256_loadu_ps(gate + i);
      const __m256 sig = _mm256_div_ps(g, _mm256_add_ps(one, exp_ps(_mm256_sub_ps(_mm256_setzero_ps(), g))));
      _mm256_storeu_ps(o + i, _mm256_mul_ps(sig, _mm256_loadu_ps(up + i)));
    }
    for (; i < inter; ++i) o[i] = gate[i] / (1.0f + std::exp(-gate[i])) * up[i];
  }
}

// ---- attention over the paged pool --------------------------------------------------

struct PagedView {
  float* k = nullptr;  // [num_blocks * block_size, Hkv, D] of one layer
  float* v = nullptr;
  int64_t block_size = 0;
  const int32_t* tables = nullptr;  // [S, width]
  int64_t width = 0;
};

inline int64_t slot_of(const PagedView& pool, int64_t seq, int64_t position) {
  const int64_t block = pool.tables[seq * pool.width + position / pool.block_size];
  return block * pool.block_size + position % pool.block_size;
}

// One token's group of query heads sharing KV head g over positions [0, length).
void attend_group(const PagedView& pool, int64_t seq, int64_t length, const float* q,
                  int64_t kv_head, int64_t group, int64_t kv_heads, int64_t head_dim, float scale, float* out,
                  std::vector<float>& scores) {
  scores.resize(static_cast<size_t>(group * length));
  const int64_t lanes = head_dim / 8;
  for (int64_t j = 0; j < length; ++j) {
    const float* key = pool.k + (slot_of(pool, seq, j) * kv_heads + kv_head) * head_dim;
    for (int64_t h = 0; h < group; ++h) {
      __m256 acc = _mm256_setzero_ps();
      for (int64_t l = 0; l < lanes; ++l)
        acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + h * head_dim + 8 * l),
                              _mm256_loadu_ps(key + 8 * l), acc);
      scores[h * length + j] = horizontal_sum(acc) * scale;
    }
  }
  for (int64_t h = 0; h < group; ++h) {
    float* s = scores.data() + h * length;
    float top = -INFINITY;
    for (int64_t j = 0; j < length; ++j) top = std::max(top, s[j]);
    const __m256 top_v = _mm256_set1_ps(top);
    __m256 total_v = _mm256_setzero_ps();
    int64_t j = 0;
    for (; j + 8 <= length; j += 8) {
      const __m256 e = exp_ps(_mm256_sub_ps(_mm256_loadu_ps(s + j), top_v));
      _mm256_storeu_ps(s + j, e);
      total_v = _mm256_add_ps(total_v, e);
    }
    float total = horizontal_sum(total_v);
    for (; j < length; ++j) {
      s[j] = std::exp(s[j] - top);
      total += s[j];
    }
    const float inv = 1.0f / total;
    for (j = 0; j < length; ++j) s[j] *= inv;
  }
  std::fill(out, out + group * head_dim, 0.0f);
  for (int64_t j = 0; j < length; ++j) {
    const float* value = pool.v + (slot_of(pool, seq, j) * kv_heads + kv_head) * head_dim;
    for (int64_t h = 0; h < group; ++h) {
      const __m256 p = _mm256_set1_ps(scores[h * length + j]);
      float* o = out + h * head_dim;
      for (int64_t l = 0; l < lanes; ++l)
        _mm256_storeu_ps(o + 8 * l, _mm256_fmadd_ps(p, _mm256_loadu_ps(value + 8 * l),
                                                     _mm256_loadu_ps(o + 8 * l)));
    }
  }
}

struct Layer {
  BlockMatrix qkv, o, gate_up, down;
  const float* input_norm = nullptr;
  const float* post_norm = nullptr;
  const float* qkv_bias = nullptr;
};

struct Model {
  std::vector<Layer> layers;
  int64_t hidden = 0, num_heads = 0, num_kv_heads = 0, head_dim = 0, inter = 0;
  float eps = 0.0f;
};

BlockMatrix matrix_of(const void* codes, const void* scales, const void* minimums, int64_t rows,
                      int64_t cols) {
  BlockMatrix m;
  m.q4 = minimums != nullptr;
  m.rows = rows;
  m.cols = cols;
  m.codes = static_cast<const uint8_t*>(codes);
  m.scales = static_cast<const uint16_t*>(scales);
  m.minimums = static_cast<const uint16_t*>(minimums);
  return m;
}

}  // namespace

extern "C" {

// A model of ``num_layers`` layers; its weights stay owned by the caller.
void* decode_model_new(int64_t num_layers, int64_t hidden, int64_t num_heads,
                       int64_t num_kv_heads, int64_t head_dim, int64_t inter, float eps) {
  auto* model = new Model();
  model->layers.resize(static_cast<size_t>(num_layers));
  model->hidden = hidden;
  model->num_heads = num_heads;
  model->num_kv_heads = num_kv_heads;
  model->head_dim = head_dim;
  model->inter = inter;
  model->eps = eps;
  return model;
}

void decode_model_free(void* model) { delete static_cast<Model*>(model); }

// Projection ``which`` (0 qkv, 1 o, 2 gate_up, 3 down) of a layer: Q4_1 where
// ``minimums`` is given, else Q8_0.
void decode_model_set_matrix(void* handle, int64_t layer, int64_t which, const void* codes,
                             const void* scales, const void* minimums, int64_t rows,
                             int64_t cols) {
  Layer& l = static_cast<Model*>(handle)->layers[static_cast<size_t>(layer)];
  BlockMatrix* slots[4] = {&l.qkv, &l.o, &l.gate_up, &l.down};
  *slots[which] = matrix_of(codes, scales, minimums, rows, cols);
}

void decode_model_set_norms(void* handle, int64_t layer, const float* input_norm,
                            const float* post_norm, const float* qkv_bias) {
  Layer& l = static_cast<Model*>(handle)->layers[static_cast<size_t>(layer)];
  l.input_norm = input_norm;
  l.post_norm = post_norm;
  l.qkv_bias = qkv_bias;
}

// hidden [T, H] in place (embedded tokens in, last layer's output out); cos_full,
// sin_signed [T, D]; pool [L, 2, num_blocks, block_size, Hkv, D]; slots [T] (where each
// token's KV goes); token_seq, token_len [T] (its block-table row, the positions it
// attends: its own slot + 1); tables [S, width].
void decode_model_forward(void* handle, float* hidden, int64_t T, const float* cos_full,
                          const float* sin_signed, float* pool, int64_t num_blocks,
                          int64_t block_size, const int64_t* slots, const int32_t* token_seq,
                          const int32_t* token_len, const int32_t* tables, int64_t width,
                          int64_t threads) {
  const Model& model = *static_cast<Model*>(handle);
  const int64_t H = model.hidden;
  const int64_t head_dim = model.head_dim;
  const int64_t q_size = model.num_heads * head_dim;
  const int64_t kv_size = model.num_kv_heads * head_dim;
  const int64_t qkv_width = q_size + 2 * kv_size;
  const int64_t inter = model.inter;
  const int64_t group = model.num_heads / model.num_kv_heads;
  const int64_t layer_slots = num_blocks * block_size;
  const float scale = 1.0f / std::sqrt(static_cast<float>(head_dim));
  std::vector<float> normed(T * H), qkv(T * qkv_width), attn(T * q_size), proj(T * H),
      gate_up(T * 2 * inter), act(T * inter);
#pragma omp parallel num_threads(threads)
  {
    std::vector<float> scores;
    for (size_t l = 0; l < model.layers.size(); ++l) {
      const Layer& layer = model.layers[l];
      PagedView view;
      view.k = pool + (2 * l) * layer_slots * kv_size;
      view.v = pool + (2 * l + 1) * layer_slots * kv_size;
      view.block_size = block_size;
      view.tables = tables;
      view.width = width;
#pragma omp single
      rms_norm(hidden, layer.input_norm, model.eps, T, H, normed.data());
      block_product(layer.qkv, normed.data(), T, qkv.data());
#pragma omp single
      for (int64_t t = 0; t < T; ++t) {
        float* row = qkv.data() + t * qkv_width;
        if (layer.qkv_bias != nullptr)
          for (int64_t i = 0; i < qkv_width; ++i) row[i] += layer.qkv_bias[i];
        const float* c = cos_full + t * head_dim;
        const float* s = sin_signed + t * head_dim;
        rotate(row, model.num_heads, head_dim, c, s);
        rotate(row + q_size, model.num_kv_heads, head_dim, c, s);
        std::copy(row + q_size, row + q_size + kv_size, view.k + slots[t] * kv_size);
        std::copy(row + q_size + kv_size, row + qkv_width, view.v + slots[t] * kv_size);
      }
#pragma omp for schedule(dynamic, 1)
      for (int64_t work = 0; work < T * model.num_kv_heads; ++work) {
        const int64_t t = work / model.num_kv_heads;
        const int64_t g = work % model.num_kv_heads;
        attend_group(view, token_seq[t], token_len[t],
                     qkv.data() + t * qkv_width + g * group * head_dim, g, group,
                     model.num_kv_heads, head_dim, scale,
                     attn.data() + t * q_size + g * group * head_dim, scores);
      }
      block_product(layer.o, attn.data(), T, proj.data());
#pragma omp single
      {
        for (int64_t i = 0; i < T * H; ++i) hidden[i] = proj[i] + hidden[i];
        rms_norm(hidden, layer.post_norm, model.eps, T, H, normed.data());
      }
      block_product(layer.gate_up, normed.data(), T, gate_up.data());
#pragma omp single
      silu_times(gate_up.data(), T, inter, act.data());
      block_product(layer.down, act.data(), T, proj.data());
#pragma omp single
      for (int64_t i = 0; i < T * H; ++i) hidden[i] = proj[i] + hidden[i];
    }
  }
}

}  // extern "C"
