// A whole decoder forward of a few tokens in one call: every layer's RMSNorm, q/k/v
// product, RoPE, KV write into the paged pool, attention over each token's block table,
// output product, SwiGLU MLP and residual sums, with the projections read from GGUF
// Q4_1 / Q8_0 blocks (rearranged in tiles of rows, see BlockMatrix); and the output
// layer's product of the final normed rows.
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
#include <array>
#include <cmath>
#include <cstdint>
#include <utility>
#include <vector>

namespace {

constexpr int64_t kBlock = 32;

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

// Outputs are stored in tiles of kTile rows; within a tile, block b of every row lies
// next to block b of the others, so a tile's product reads one sequential stream.
constexpr int64_t kTile = 4;

// One matrix [N, K] of Q4_1 (codes two a byte) or Q8_0 blocks in tiles. Each entry is a
// block's codes, then its step d (and Q4_1 minimum m) widened to fp32: a broadcast from
// memory costs no shuffle, which the nibble unpacking already keeps busy.
struct BlockMatrix {
  bool q4 = true;
  int64_t rows = 0;
  int64_t cols = 0;
  int64_t blocks = 0;  // cols / kBlock
  int64_t entry = 0;   // bytes of one block's entry
  const uint8_t* data = nullptr;

  // Block b of output n, rebuilt in fp32; Q4 is the format (a template argument, so
  // the loops that call it carry no branch).
  template <bool Q4>
  inline BlockWeights block(int64_t n, int64_t b) const {
    const uint8_t* at = data + (((n / kTile) * blocks + b) * kTile + n % kTile) * entry;
    BlockWeights out;
    if constexpr (Q4) {
      const float* steps = reinterpret_cast<const float*>(at + kBlock / 2);
      const __m256 d = _mm256_broadcast_ss(steps);
      const __m256 m = _mm256_broadcast_ss(steps + 1);
      // Bytes 0-7 and 8-15 widened straight from memory (one shuffle each): the low
      // nibbles are codes 0-7 and 8-15, the high nibbles codes 16-23 and 24-31.
      const __m256i first = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(at)));
      const __m256i second =
          _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(at + 8)));
      const __m256i mask = _mm256_set1_epi32(0x0F);
      out.w[0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(first, mask)), d, m);
      out.w[1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(second, mask)), d, m);
      out.w[2] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(first, 4)), d, m);
      out.w[3] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(second, 4)), d, m);
    } else {
      const __m256 d = _mm256_broadcast_ss(reinterpret_cast<const float*>(at + kBlock));
      for (int g = 0; g < 4; ++g) {
        const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(at + 8 * g));
        out.w[g] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes)), d);
      }
    }
    return out;
  }
};

// out[r, n] = sum_k x[r, k] W[n, k] for R rows from ``row`` and outputs n0 .. n0 + O - 1.
// Each block is rebuilt once and used for every row; O outputs in flight keep enough
// independent FMA chains when R is small.
template <bool Q4, int R, int O>
inline void dot_tile(const BlockMatrix& w, const float* x, int64_t row, int64_t n0, float* out,
                     int64_t out_stride) {
  __m256 acc[R][O];
  for (int r = 0; r < R; ++r)
    for (int o = 0; o < O; ++o) acc[r][o] = _mm256_setzero_ps();
  const int64_t blocks = w.cols / kBlock;
  const float* x0 = x + row * w.cols;
  for (int64_t b = 0; b < blocks; ++b) {
    for (int o = 0; o < O; ++o) {
      const BlockWeights weights = w.block<Q4>(n0 + o, b);
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

// The one-row case (a batch-1 decode step): each block's x is loaded once for O outputs,
// and each output keeps two accumulators, so no FMA waits on the one before it in the
// same block.
template <bool Q4, int O>
inline void dot_tile_one_row(const BlockMatrix& w, const float* x, int64_t n0, float* out) {
  __m256 even[O], odd[O];
  for (int o = 0; o < O; ++o) even[o] = odd[o] = _mm256_setzero_ps();
  const int64_t blocks = w.cols / kBlock;
  for (int64_t b = 0; b < blocks; ++b) {
    const float* xb = x + b * kBlock;
    const __m256 x0 = _mm256_loadu_ps(xb), x1 = _mm256_loadu_ps(xb + 8),
                 x2 = _mm256_loadu_ps(xb + 16), x3 = _mm256_loadu_ps(xb + 24);
#pragma GCC unroll 8
    for (int o = 0; o < O; ++o) {
      const BlockWeights weights = w.block<Q4>(n0 + o, b);
      even[o] = _mm256_fmadd_ps(weights.w[0], x0, even[o]);
      odd[o] = _mm256_fmadd_ps(weights.w[1], x1, odd[o]);
      even[o] = _mm256_fmadd_ps(weights.w[2], x2, even[o]);
      odd[o] = _mm256_fmadd_ps(weights.w[3], x3, odd[o]);
    }
  }
  for (int o = 0; o < O; ++o) out[n0 + o] = horizontal_sum(_mm256_add_ps(even[o], odd[o]));
}

template <bool Q4, int R>
inline void dot_outputs(const BlockMatrix& w, const float* x, int64_t row, int64_t begin,
                        int64_t end, float* out, int64_t stride) {
  constexpr int O = R == 1 ? 4 : (R == 2 ? 2 : 1);
  int64_t n = begin;
  if constexpr (R == 1) {
    for (; n + O <= end; n += O) dot_tile_one_row<Q4, O>(w, x + row * w.cols, n, out + row * stride);
    for (; n < end; ++n) dot_tile_one_row<Q4, 1>(w, x + row * w.cols, n, out + row * stride);
    return;
  }
  for (; n + O <= end; n += O) dot_tile<Q4, R, O>(w, x, row, n, out, stride);
  for (; n < end; ++n) dot_tile<Q4, R, 1>(w, x, row, n, out, stride);
}

template <bool Q4, int R>
inline void dot_rows_tail(const BlockMatrix& w, const float* x, int64_t row, int64_t left,
                          int64_t begin, int64_t end, float* out, int64_t stride) {
  if constexpr (R > 0) {
    if (left == R)
      dot_outputs<Q4, R>(w, x, row, begin, end, out, stride);
    else
      dot_rows_tail<Q4, R - 1>(w, x, row, left, begin, end, out, stride);
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
  if (w.q4) {
    for (; row + 8 <= tokens; row += 8) dot_outputs<true, 8>(w, x, row, begin, end, out, w.rows);
    dot_rows_tail<true, 7>(w, x, row, tokens - row, begin, end, out, w.rows);
  } else {
    for (; row + 8 <= tokens; row += 8) dot_outputs<false, 8>(w, x, row, begin, end, out, w.rows);
    dot_rows_tail<false, 7>(w, x, row, tokens - row, begin, end, out, w.rows);
  }
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

// Eight dot products of q [8 * LANES] with rows k0 .. k7, as one vector: eight
// independent FMA chains, reduced together.
template <int LANES>
inline __m256 eight_dots(const float* q, const float* const* keys) {
  __m256 acc[8];
  for (int j = 0; j < 8; ++j) acc[j] = _mm256_setzero_ps();
  for (int l = 0; l < LANES; ++l) {
    const __m256 ql = _mm256_loadu_ps(q + 8 * l);
    for (int j = 0; j < 8; ++j)
      acc[j] = _mm256_fmadd_ps(ql, _mm256_loadu_ps(keys[j] + 8 * l), acc[j]);
  }
  const __m256 t0 = _mm256_hadd_ps(acc[0], acc[1]);
  const __m256 t1 = _mm256_hadd_ps(acc[2], acc[3]);
  const __m256 t2 = _mm256_hadd_ps(acc[4], acc[5]);
  const __m256 t3 = _mm256_hadd_ps(acc[6], acc[7]);
  const __m256 u0 = _mm256_hadd_ps(t0, t1);  // lanes: 0 1 2 3 | 0 1 2 3 (low, high halves)
  const __m256 u1 = _mm256_hadd_ps(t2, t3);  // lanes: 4 5 6 7 | 4 5 6 7
  return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

// Rows of one KV head at positions [0, length) of a sequence, walked block by block.
struct HeadRows {
  const float* base = nullptr;  // k or v of one layer
  const int32_t* table = nullptr;
  int64_t block_size = 0, stride = 0, kv_head = 0, head_dim = 0;

  inline const float* row(int64_t block, int64_t offset) const {
    return base + ((block * block_size + offset) * stride + kv_head) * head_dim;
  }
};

// One work item of a token's attention: the query heads of one KV head ([group, D],
// D = 8 * LANES) over positions [begin, end) of the token's sequence. Every K and V row
// is read once for the whole group. The output is left unnormalised against the part's
// own maximum (``top``) with its sum of weights (``total``); ``merge_parts`` combines a
// token's parts, as flash-decoding does, so one token's positions can be split over
// threads.
template <int LANES>
void attend_part(const PagedView& pool, int64_t seq, int64_t begin, int64_t end,
                 const float* q, int64_t group, int64_t kv_head, int64_t kv_heads, float scale,
                 float* out, float* top, float* total, std::vector<float>& scores) {
  constexpr int64_t head_dim = 8 * LANES;
  const int64_t length = end - begin;
  const int64_t padded = (length + 7) / 8 * 8;
  scores.resize(static_cast<size_t>(group * padded));
  const int32_t* table = pool.tables + seq * pool.width;
  const HeadRows keys{pool.k, table, pool.block_size, kv_heads, kv_head, head_dim};
  const HeadRows values{pool.v, table, pool.block_size, kv_heads, kv_head, head_dim};
  const __m256 scale_v = _mm256_set1_ps(scale);
  const float* rows[8];
  int pending = 0;
  int64_t done = 0;
  auto score_rows = [&]() {
    for (int j = pending; j < 8; ++j) rows[j] = rows[0];
    for (int64_t h = 0; h < group; ++h)
      _mm256_storeu_ps(scores.data() + h * padded + done,
                       _mm256_mul_ps(eight_dots<LANES>(q + h * head_dim, rows), scale_v));
    done += 8;
    pending = 0;
  };
  for (int64_t position = begin; position < end;) {
    const int64_t block = table[position / pool.block_size];
    const int64_t offset = position % pool.block_size;
    const int64_t count = std::min(pool.block_size - offset, end - position);
    for (int64_t i = 0; i < count; ++i) {
      rows[pending++] = keys.row(block, offset + i);
      if (pending == 8) score_rows();
    }
    position += count;
  }
  if (pending > 0) score_rows();
  for (int64_t h = 0; h < group; ++h) {
    float* s = scores.data() + h * padded;
    float best = -INFINITY;
    for (int64_t j = 0; j < length; ++j) best = std::max(best, s[j]);
    const __m256 best_v = _mm256_set1_ps(best);
    __m256 sum_v = _mm256_setzero_ps();
    int64_t j = 0;
    for (; j + 8 <= length; j += 8) {
      const __m256 e = exp_ps(_mm256_sub_ps(_mm256_loadu_ps(s + j), best_v));
      _mm256_storeu_ps(s + j, e);
      sum_v = _mm256_add_ps(sum_v, e);
    }
    float sum = horizontal_sum(sum_v);
    for (; j < length; ++j) {
      s[j] = std::exp(s[j] - best);
      sum += s[j];
    }
    top[h] = best;
    total[h] = sum;
  }
  std::fill(out, out + group * head_dim, 0.0f);
  int64_t index = 0;
  for (int64_t position = begin; position < end;) {
    const int64_t block = table[position / pool.block_size];
    const int64_t offset = position % pool.block_size;
    const int64_t count = std::min(pool.block_size - offset, end - position);
    for (int64_t h = 0; h < group; ++h) {
      float* o = out + h * head_dim;
      const float* weights = scores.data() + h * padded + index;
      __m256 acc[LANES];
      for (int l = 0; l < LANES; ++l) acc[l] = _mm256_loadu_ps(o + 8 * l);
      for (int64_t i = 0; i < count; ++i) {
        const __m256 w = _mm256_set1_ps(weights[i]);
        const float* value = values.row(block, offset + i);
        for (int l = 0; l < LANES; ++l)
          acc[l] = _mm256_fmadd_ps(w, _mm256_loadu_ps(value + 8 * l), acc[l]);
      }
      for (int l = 0; l < LANES; ++l) _mm256_storeu_ps(o + 8 * l, acc[l]);
    }
    index += count;
    position += count;
  }
}

using AttendPart = void (*)(const PagedView&, int64_t, int64_t, int64_t, const float*, int64_t,
                            int64_t, int64_t, float, float*, float*, float*,
                            std::vector<float>&);

template <int... L>
constexpr std::array<AttendPart, sizeof...(L)> attend_parts(std::integer_sequence<int, L...>) {
  return {&attend_part<L + 1>...};
}

// attend_part for head_dim = 8, 16, ..., 128 (the Python side refuses any other).
constexpr auto kAttendPart = attend_parts(std::make_integer_sequence<int, 16>{});

// One head's output [D] from its parts' unnormalised outputs (stride ``stride``), maxima
// and sums: sum_p exp(top_p - M) out_p / sum_p exp(top_p - M) total_p.
void merge_parts(int64_t parts, int64_t head_dim, const float* outs, int64_t stride,
                 const float* tops, const float* totals, int64_t step, float* out) {
  float best = -INFINITY;
  for (int64_t p = 0; p < parts; ++p) best = std::max(best, tops[p * step]);
  float denominator = 0.0f;
  std::fill(out, out + head_dim, 0.0f);
  for (int64_t p = 0; p < parts; ++p) {
    if (totals[p * step] == 0.0f) continue;  // an empty part
    const float weight = std::exp(tops[p * step] - best);
    denominator += weight * totals[p * step];
    for (int64_t i = 0; i < head_dim; ++i) out[i] += weight * outs[p * stride + i];
  }
  const float inv = 1.0f / denominator;
  for (int64_t i = 0; i < head_dim; ++i) out[i] *= inv;
}

struct Layer {
  BlockMatrix qkv, o, gate_up, down;
  const float* input_norm = nullptr;
  const float* post_norm = nullptr;
  const float* qkv_bias = nullptr;
};

struct Model {
  std::vector<Layer> layers;
  BlockMatrix output;  // the output layer (rows = vocabulary), where one was given
  int64_t hidden = 0, num_heads = 0, num_kv_heads = 0, head_dim = 0, inter = 0;
  float eps = 0.0f;
};

BlockMatrix matrix_of(const void* data, bool q4, int64_t rows, int64_t cols) {
  BlockMatrix m;
  m.q4 = q4;
  m.rows = rows;
  m.cols = cols;
  m.blocks = cols / kBlock;
  m.entry = q4 ? kBlock / 2 + 8 : kBlock + 4;
  m.data = static_cast<const uint8_t*>(data);
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

// Projection ``which`` (0 qkv, 1 o, 2 gate_up, 3 down) of a layer: Q4_1 blocks where
// ``q4``, else Q8_0, in tiles of kTile rows (``fused_decode.tiled_blocks``).
void decode_model_set_matrix(void* handle, int64_t layer, int64_t which, const void* data,
                             int64_t q4, int64_t rows, int64_t cols) {
  Layer& l = static_cast<Model*>(handle)->layers[static_cast<size_t>(layer)];
  BlockMatrix* slots[4] = {&l.qkv, &l.o, &l.gate_up, &l.down};
  *slots[which] = matrix_of(data, q4 != 0, rows, cols);
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
  const AttendPart attend = kAttendPart[static_cast<size_t>(head_dim / 8 - 1)];
  // Each token's KV heads split in position parts, so that even one token gives every
  // thread about two work items.
  const int64_t heads_of_tokens = T * model.num_kv_heads;
  const int64_t parts = std::max<int64_t>(1, (2 * threads + heads_of_tokens - 1) / heads_of_tokens);
  const int64_t items = heads_of_tokens * parts;
  std::vector<float> part_out(items * group * head_dim), part_top(items * group),
      part_total(items * group);
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
#pragma omp for schedule(static)
      for (int64_t work = 0; work < items; ++work) {
        const int64_t t = work / (model.num_kv_heads * parts);
        const int64_t g = work / parts % model.num_kv_heads;
        const int64_t part = work % parts;
        const int64_t length = token_len[t];
        attend(view, token_seq[t], length * part / parts, length * (part + 1) / parts,
               qkv.data() + t * qkv_width + g * group * head_dim, group, g, model.num_kv_heads,
               scale, part_out.data() + work * group * head_dim, part_top.data() + work * group,
               part_total.data() + work * group, scores);
      }
#pragma omp for schedule(static)
      for (int64_t work = 0; work < T * model.num_heads; ++work) {
        const int64_t t = work / model.num_heads;
        const int64_t h = work % model.num_heads;
        const int64_t first = (t * model.num_kv_heads + h / group) * parts;
        merge_parts(parts, head_dim, part_out.data() + (first * group + h % group) * head_dim,
                    group * head_dim, part_top.data() + first * group + h % group,
                    part_total.data() + first * group + h % group, group,
                    attn.data() + t * q_size + h * head_dim);
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

// The output layer's blocks, in the same tiles (``fused_decode.tiled_blocks``).
void decode_model_set_output(void* handle, const void* data, int64_t q4, int64_t rows,
                             int64_t cols) {
  static_cast<Model*>(handle)->output = matrix_of(data, q4 != 0, rows, cols);
}

// logits [T, vocabulary] = normed [T, H] times the output layer, on ``threads`` threads.
void decode_model_logits(void* handle, const float* normed, int64_t T, float* logits,
                         int64_t threads) {
  const BlockMatrix& output = static_cast<Model*>(handle)->output;
#pragma omp parallel num_threads(threads)
  block_product(output, normed, T, logits);
}

}  // extern "C"
