/* Row-wise float32 operations of a decoder layer, as single C calls (row_ops.py says why).
 *
 * At batch 1 a decode step is bound by per-operation cost outside the linears: torch.rms_norm
 * is seven small ATen operations on CPU, and the rotary embedding five. Each function here does
 * one row after another in one fixed order, so a row's result never depends on the rows beside
 * it (what keeps a verify step's logits equal to a one-token step's), and a row of many is
 * computed exactly as the same row alone.
 *
 * Built by row_kernel.py's builder with the system C compiler (-O3 -march=native -fopenmp). */
#include <math.h>
#include <stdint.h>

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

/* Rotary embedding in place, half-split layout (Llama, Gemma): the first `heads` head vectors of
 * each row (row_stride floats apart) rotate by that row's cos and sign-folded sin (RopeTable):
 * y[i] = x[i] * cos[i] + x[i +- half] * sin[i]. */
void aurora_rope(float *x, int64_t rows, int64_t row_stride, int64_t heads, int64_t head_dim,
                 const float *cos, const float *sin, int threads) {
  int64_t half = head_dim / 2;
#pragma omp parallel for schedule(static) num_threads(threads) if (rows * heads * head_dim >= BIG)
  for (int64_t r = 0; r < rows; r++) {
    const float *cr = cos + r * head_dim, *sr = sin + r * head_dim;
    for (int64_t h = 0; h < heads; h++) {
      float *v = x + r * row_stride + h * head_dim;
      for (int64_t i = 0; i < half; i++) {
        float lo = v[i], hi = v[i + half];
        v[i] = lo * cr[i] + hi * sr[i];
        v[i + half] = hi * cr[i + half] + lo * sr[i + half];
      }
    }
  }
}

/* The same rotation with each row's angles computed here, pos[r] * inv_freq[i] in float32 as
 * layers.rope_cos_sin computes them (the draft head, which keeps no table). */
void aurora_rope_at(float *x, int64_t rows, int64_t row_stride, int64_t heads, int64_t head_dim,
                    const int64_t *pos, const float *inv_freq) {
  int64_t half = head_dim / 2;
  for (int64_t r = 0; r < rows; r++) {
    float c[half], s[half];
    for (int64_t i = 0; i < half; i++) {
      float angle = (float)pos[r] * inv_freq[i];
      c[i] = cosf(angle);
      s[i] = sinf(angle);
    }
    for (int64_t h = 0; h < heads; h++) {
      float *v = x + r * row_stride + h * head_dim;
      for (int64_t i = 0; i < half; i++) {
        float lo = v[i], hi = v[i + half];
        v[i] = lo * c[i] - hi * s[i];
        v[i + half] = hi * c[i] + lo * s[i];
      }
    }
  }
}
