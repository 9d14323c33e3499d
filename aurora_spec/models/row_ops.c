/* Row-wise float32 operations of a decoder layer, as single C calls (row_ops.py says why).
 *
 * At batch 1 a decode step is bound by per-operation cost outside the linears: torch.rms_norm
 * is seven small ATen operations on CPU, the rotary embedding five, and attention with its cache
 * writes about ten. Each function here computes one row (or one token and head) after another in
 * one fixed order, so a row's result never depends on the rows beside it (what keeps a verify
 * step's logits equal to a one-token step's), and a row of many is computed exactly as the same
 * row alone.
 *
 * Built by row_kernel.py's builder with the system C compiler (-O3 -march=native -fopenmp). */
#include <math.h>
#include <stdint.h>
#include <string.h>

#define PARTS 16 /* partial sums of squares per row, in a fixed order (vectorises, any rows) */
/* floats from which a call splits its rows between threads (prefill); which thread computes a
 * row cannot change its result */
#define BIG (1 << 16)

/* out[r] = x[r] / sqrt(mean(x[r]^2) + eps) * (w + offset), for rows of dim floats. */
void aurora_rms_norm(const float *x, int64_t rows, int64_t dim, const float *w, float offset,
                     float eps, float *out, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads) if (rows * dim >= BIG)
  for (int64_t r = 0; r < rows; r++) {
    const float *xr = x + r * dim;
    float part[PARTS] = {0};
    int64_t c = 0;
    for (; c + PARTS <= dim; c += PARTS)
      for (int j = 0; j < PARTS; j++) part[j] += xr[c + j] * xr[c + j];
    float sum = 0.0f;
    for (int j = 0; j < PARTS; j++) sum += part[j];
    for (; c < dim; c++) sum += xr[c] * xr[c];
    float scale = 1.0f / sqrtf(sum / (float)dim + eps);
    float *o = out + r * dim;
    for (c = 0; c < dim; c++) o[c] = xr[c] * scale * (w[c] + offset);
  }
}

/* Rotate the first `heads` head vectors of one row in place by cos and sign-folded sin
 * (RopeTable's layout): y[i] = x[i] * cos[i] + x[i +- half] * sin[i]. */
static void rotate_row(float *row, int64_t heads, int64_t head_dim, const float *cos,
                       const float *sin) {
  int64_t half = head_dim / 2;
  for (int64_t h = 0; h < heads; h++) {
    float *v = row + h * head_dim;
    for (int64_t i = 0; i < half; i++) {
      float lo = v[i], hi = v[i + half];
      v[i] = lo * cos[i] + hi * sin[i];
      v[i + half] = hi * cos[i + half] + lo * sin[i + half];
    }
  }
}

/* Rotary embedding in place, half-split layout (Llama, Gemma): the first `heads` head vectors of
 * each row (row_stride floats apart) rotate by that row's cos and sign-folded sin (RopeTable). */
void aurora_rope(float *x, int64_t rows, int64_t row_stride, int64_t heads, int64_t head_dim,
                 const float *cos, const float *sin, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads) if (rows * heads * head_dim >= BIG)
  for (int64_t r = 0; r < rows; r++)
    rotate_row(x + r * row_stride, heads, head_dim, cos + r * head_dim, sin + r * head_dim);
}

/* The same rotation with each row's angles computed here, pos[r] * inv_freq[i] in float32 as
 * layers.rope_cos_sin computes them (the draft head, which keeps no table). */
void aurora_rope_at(float *x, int64_t rows, int64_t row_stride, int64_t heads, int64_t head_dim,
                    const int64_t *pos, const float *inv_freq) {
  int64_t half = head_dim / 2;
  for (int64_t r = 0; r < rows; r++) {
    float c[head_dim], s[head_dim];
    for (int64_t i = 0; i < half; i++) {
      float angle = (float)pos[r] * inv_freq[i];
      c[i] = c[i + half] = cosf(angle);
      s[i + half] = sinf(angle);
      s[i] = -s[i + half];
    }
    rotate_row(x + r * row_stride, heads, head_dim, c, s);
  }
}

/* GCC vectorises the exp loops (SiLU, attention's softmax) only without trapping math (the
 * clamp is control flow otherwise), and contracts no multiply-add into an FMA, so that the
 * vector body and a scalar remainder (which elements fall in which depends on the output's
 * alignment) round every step alike: each float's result never depends on where it sits in
 * memory. */
#define ELEMENTWISE __attribute__((optimize("no-trapping-math", "fp-contract=off")))

/* exp(x) for the SiLU and the softmax, branch-free so their loops vectorise (libm's expf is a
 * call per float: ~30% of attention's time with one per key): Cody-Waite reduction
 * x = n ln2 + r with ln2 in two parts, then Cephes' degree-6 polynomial for exp(r), scaled by
 * 2^n through the exponent bits; within a few ulp of expf over the clamped range [-87.3, 88.3]
 * (tests/unit/test_row_ops.py). */
static inline ELEMENTWISE float exp_poly(float x) {
  x = x < -87.3f ? -87.3f : (x > 88.3f ? 88.3f : x);
  float n = floorf(x * 1.44269504088896341f + 0.5f);
  float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  union { int32_t i; float f; } scale = {.i = ((int32_t)n + 127) << 23};
  return p * scale.f;
}

/* e[j] = exp(s[j] - top) in place for one head's scores; masked keys (m[j] = -inf) get 0 (and
 * exp_poly sees 0 for them, never a NaN, even when every key is masked and top is -inf). */
static ELEMENTWISE void exp_scores(float *s, const float *m, int64_t n, float top) {
  for (int64_t j = 0; j < n; j++) {
    int masked = m[j] == -INFINITY;
    float e = exp_poly(masked ? 0.0f : s[j] - top);
    s[j] = masked ? 0.0f : e;
  }
}

typedef float v16 __attribute__((vector_size(64)));
typedef float v16u __attribute__((vector_size(64), aligned(4), may_alias));

/* acc[c] = sum over unmasked keys j, in position order, of e[j] * vals[j, c]: each output the
 * chain the plain loop (pv_any) makes, with the D outputs in registers instead of stored back
 * at every key (the store of each key's update bounded the loop). Returns the weights' sum, in
 * the same order as the plain sum loop (here its chain of adds overlaps the multiply-adds). */
#define PV_FIXED(D)                                                                         \
  static float pv_##D(const float *e, const float *m, const float *vals, int64_t kv_len,    \
                      float *acc) {                                                         \
    v16 a[D / 16];                                                                          \
    float sum = 0.0f;                                                                       \
    for (int v = 0; v < D / 16; v++) a[v] = (v16){0};                                       \
    for (int64_t j = 0; j < kv_len; j++) {                                                  \
      if (m[j] == -INFINITY) continue;                                                      \
      sum += e[j];                                                                          \
      for (int v = 0; v < D / 16; v++) a[v] += e[j] * *(const v16u *)(vals + j * D + v * 16); \
    }                                                                                       \
    for (int v = 0; v < D / 16; v++) *(v16u *)(acc + v * 16) = a[v];                       \
    return sum;                                                                             \
  }
PV_FIXED(64)
#ifdef __AVX512F__
PV_FIXED(128) /* 8 registers of 16; with AVX2's 16 registers of 8 it would spill */
#endif

typedef float v8 __attribute__((vector_size(32)));
typedef float v8u __attribute__((vector_size(32), aligned(4), may_alias));
typedef int32_t v8i __attribute__((vector_size(32)));

#define INLINE static inline __attribute__((always_inline))

/* The score loop's dot product for d = 8 * n8, its arithmetic exactly: eight lane partials,
 * each an FMA chain over the head's n8 8-float slices from 0, then summed in lane order from 0. */
INLINE float dot_d(const v8 *q, const float *k, int n8) {
  v8 part = (v8){0};
  for (int c = 0; c < n8; c++) part += q[c] * *(const v8u *)(k + 8 * c);
  float dot = 0.0f;
  for (int l = 0; l < 8; l++) dot += part[l];
  return dot;
}

/* Eight keys' dot products with q, each as dot_d computes it: the partials of key r are p[r];
 * transposed, lane l of all eight keys is one vector, so the lane-order sums of the eight keys
 * are eight vector adds instead of 56 scalar ones (those sums, a chain of dependent adds per
 * key, were the loop's bottleneck). */
INLINE v8 dots8(const v8 *q, const float *k, int n8) {
  v8 p[8];
  for (int r = 0; r < 8; r++) {
    v8 a = (v8){0};
    for (int c = 0; c < n8; c++) a += q[c] * *(const v8u *)(k + (r * n8 + c) * 8);
    p[r] = a;
  }
  v8 t[8], u[8], lane[8];
  for (int r = 0; r < 8; r += 2) { /* pairs of keys, interleaved within 128-bit halves */
    t[r] = __builtin_shufflevector(p[r], p[r + 1], 0, 8, 1, 9, 4, 12, 5, 13);
    t[r + 1] = __builtin_shufflevector(p[r], p[r + 1], 2, 10, 3, 11, 6, 14, 7, 15);
  }
  for (int r = 0; r < 8; r += 4) { /* four keys: lanes (0|4), (1|5), (2|6), (3|7) */
    u[r] = __builtin_shufflevector(t[r], t[r + 2], 0, 1, 8, 9, 4, 5, 12, 13);
    u[r + 1] = __builtin_shufflevector(t[r], t[r + 2], 2, 3, 10, 11, 6, 7, 14, 15);
    u[r + 2] = __builtin_shufflevector(t[r + 1], t[r + 3], 0, 1, 8, 9, 4, 5, 12, 13);
    u[r + 3] = __builtin_shufflevector(t[r + 1], t[r + 3], 2, 3, 10, 11, 6, 7, 14, 15);
  }
  for (int l = 0; l < 4; l++) { /* keys 0-3 and 4-7 side by side: lane l, lane l + 4 */
    lane[l] = __builtin_shufflevector(u[l], u[l + 4], 0, 1, 2, 3, 8, 9, 10, 11);
    lane[l + 4] = __builtin_shufflevector(u[l], u[l + 4], 4, 5, 6, 7, 12, 13, 14, 15);
  }
  v8 dot = (v8){0};
  for (int l = 0; l < 8; l++) dot += lane[l];
  return dot;
}

/* score[j] = q . key j * scale for unmasked keys, -inf for masked ones; returns the largest.
 * The plain loop's values (aurora_attend, any d), eight keys at a time, for d = 8 * n8 with
 * q's n8 slices in registers. */
INLINE float scores_d(const float *q, const float *keys, const float *m, int64_t kv_len,
                      float scale, float *score, int n8) {
  v8 qv[16];
  for (int c = 0; c < n8; c++) qv[c] = *(const v8u *)(q + 8 * c);
  const v8 ninf = (v8){0} - INFINITY;
  v8 topv = ninf;
  int64_t j = 0;
  for (; j + 8 <= kv_len; j += 8) {
    v8 mv = *(const v8u *)(m + j);
    v8i masked = mv == ninf;
    v8 s = dots8(qv, keys + j * n8 * 8, n8) * scale + mv;
    s = (v8)(((v8i)s & ~masked) | ((v8i)ninf & masked));
    *(v8u *)(score + j) = s;
    v8i more = s > topv;
    topv = (v8)(((v8i)s & more) | ((v8i)topv & ~more));
  }
  float top = -INFINITY;
  for (int l = 0; l < 8; l++)
    if (topv[l] > top) top = topv[l];
  for (; j < kv_len; j++) {
    score[j] = -INFINITY;
    if (m[j] == -INFINITY) continue;
    score[j] = dot_d(qv, keys + j * n8 * 8, n8) * scale + m[j];
    if (score[j] > top) top = score[j];
  }
  return top;
}

static float scores_64(const float *q, const float *keys, const float *m, int64_t kv_len,
                       float scale, float *score) {
  return scores_d(q, keys, m, kv_len, scale, score, 8);
}

#ifdef __AVX512F__
static float scores_128(const float *q, const float *keys, const float *m, int64_t kv_len,
                        float scale, float *score) { /* q's 16 slices fit AVX-512's registers */
  return scores_d(q, keys, m, kv_len, scale, score, 16);
}
#endif

/* scores_d's job for any head size, one key at a time. */
static float scores_any(const float *q, const float *keys, const float *m, int64_t kv_len,
                        int64_t d, float scale, float *score) {
  float top = -INFINITY;
  for (int64_t j = 0; j < kv_len; j++) {
    score[j] = -INFINITY; /* masked keys: a defined value for the exp pass, weighted 0 there */
    if (m[j] == -INFINITY) continue;
    float part[8] = {0};
    int64_t c = 0;
    for (; c + 8 <= d; c += 8)
      for (int l = 0; l < 8; l++) part[l] += q[c + l] * keys[j * d + c + l];
    float dot = 0.0f;
    for (int l = 0; l < 8; l++) dot += part[l];
    for (; c < d; c++) dot += q[c] * keys[j * d + c];
    score[j] = dot * scale + m[j];
    if (score[j] > top) top = score[j];
  }
  return top;
}

static float pv_any(const float *e, const float *m, const float *vals, int64_t kv_len,
                    int64_t d, float *acc) {
  float sum = 0.0f;
  for (int64_t c = 0; c < d; c++) acc[c] = 0.0f;
  for (int64_t j = 0; j < kv_len; j++) {
    if (m[j] == -INFINITY) continue;
    sum += e[j];
    for (int64_t c = 0; c < d; c++) acc[c] += e[j] * vals[j * d + c];
  }
  return sum;
}

/* One layer's attention for n query tokens, in the layout of the fused q/k/v projection (rows of
 * width w: nq query heads, nkv key heads, nkv value heads, d floats each, q and k rotated).
 * Token i writes its key and value into the cache, (B, nkv, cap, d), at batch row batch[i] and
 * position pos[i], then attends over that row's first kv_len positions under mask row
 * mask_row[i] of the additive (0 / -inf) mask, (rows, kv_len); out is (n, nq * d). With batch
 * NULL the tokens are a plain (B, T) block written at start .. start + T - 1 (token i: batch row
 * i / t, position start + i % t, mask row i).
 *
 * Each (token, head) pair is computed alone, masked keys contributing nothing (for head sizes
 * 64 and 128 their scores are computed in blocks of eight keys and dropped), unmasked keys in
 * position order: a token's result does not depend on the tokens beside it, on kv_len past its
 * own keys, or on the thread that computes it. A key's score has the same bits in a block of
 * eight as in the tail after the last block: both are the multiply-adds the compiler contracts
 * (GCC's default -ffp-contract=fast) in the same order (tests/unit/test_row_ops.py). */
void aurora_attend(const float *qkv, int64_t n, int64_t w, int64_t nq, int64_t nkv, int64_t d,
                   float *k_cache, float *v_cache, int64_t cap, int64_t kv_len,
                   const int64_t *batch, const int64_t *pos, const int64_t *mask_row,
                   int64_t t, int64_t start, const float *mask, float scale, float *out,
                   int threads) {
  for (int64_t i = 0; i < n; i++) { /* keys and values first: every query may read them */
    int64_t b = batch ? batch[i] : i / t, p = batch ? pos[i] : start + i % t;
    for (int64_t g = 0; g < nkv; g++) {
      memcpy(k_cache + ((b * nkv + g) * cap + p) * d, qkv + i * w + (nq + g) * d, d * 4);
      memcpy(v_cache + ((b * nkv + g) * cap + p) * d, qkv + i * w + (nq + nkv + g) * d, d * 4);
    }
  }
  int64_t group = nq / nkv;
#pragma omp parallel for schedule(static) num_threads(threads) if (n * nq * kv_len * d >= BIG)
  for (int64_t job = 0; job < n * nq; job++) {
    int64_t i = job / nq, h = job % nq, b = batch ? batch[i] : i / t;
    const float *q = qkv + i * w + h * d;
    const float *keys = k_cache + (b * nkv + h / group) * cap * d;
    const float *vals = v_cache + (b * nkv + h / group) * cap * d;
    const float *m = mask + (batch ? mask_row[i] : i) * kv_len;
    float score[kv_len], acc[d], top, sum;
    if (d == 64)
      top = scores_64(q, keys, m, kv_len, scale, score);
#ifdef __AVX512F__
    else if (d == 128)
      top = scores_128(q, keys, m, kv_len, scale, score);
#endif
    else
      top = scores_any(q, keys, m, kv_len, d, scale, score);
    exp_scores(score, m, kv_len, top);  /* score[j] is now key j's weight */
    if (d == 64)
      sum = pv_64(score, m, vals, kv_len, acc);
#ifdef __AVX512F__
    else if (d == 128)
      sum = pv_128(score, m, vals, kv_len, acc);
#endif
    else
      sum = pv_any(score, m, vals, kv_len, d, acc);
    float *o = out + i * nq * d + h * d;
    for (int64_t c = 0; c < d; c++) o[c] = sum > 0.0f ? acc[c] / sum : 0.0f;
  }
}

/* The gated MLP's activation: out[r, i] = silu(gu[r, i]) * gu[r, dim + i] for rows of the fused
 * gate/up projection (2 * dim floats: gate, then up), silu(g) = g / (1 + exp(-g)). */
ELEMENTWISE void aurora_silu_mul(const float *gu, int64_t rows, int64_t dim, float *out,
                                 int threads) {
#pragma omp parallel for schedule(static) num_threads(threads) if (rows * dim >= BIG)
  for (int64_t r = 0; r < rows; r++) {
    const float *g = gu + r * 2 * dim, *u = g + dim;
    float *o = out + r * dim;
    for (int64_t i = 0; i < dim; i++) o[i] = g[i] / (1.0f + exp_poly(-g[i])) * u[i];
  }
}

/* A residual add and the RMSNorm after it, in one call: sum = x + y (written to sum, which may
 * be x itself), then out = aurora_rms_norm(sum). The sum is the same float add PyTorch makes, so
 * the residual stream keeps its bits. */
void aurora_add_rms_norm(const float *x, const float *y, int64_t rows, int64_t dim,
                         const float *w, float offset, float eps, float *sum, float *out,
                         int threads) {
#pragma omp parallel for schedule(static) num_threads(threads) if (rows * dim >= BIG)
  for (int64_t r = 0; r < rows; r++)
    for (int64_t c = 0; c < dim; c++) sum[r * dim + c] = x[r * dim + c] + y[r * dim + c];
  aurora_rms_norm(sum, rows, dim, w, offset, eps, out, threads);
}
