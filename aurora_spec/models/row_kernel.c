/* Row-independent float32 linear for CPU decode and verify steps (row_kernel.py says why).
 *
 * y[r, n] = sum_k x[r, k] * w[n, k] (+ bias[n]). Every output is reduced in one fixed order:
 * 16-lane partial sums over k, then the same 16 -> 1 tree, whatever the number of rows in the
 * call and whichever thread computes it. So a row's result never depends on the rows beside it,
 * which is what keeps a verify step's logits equal to a one-token step's. The weights are packed
 * once into blocks of 4 output rows so the kernel reads one sequential stream; a step of up to 6
 * rows (one register tile) is bound by that read, so 6 rows cost little more than 1.
 *
 * Built by row_kernel.py with the system C compiler (-O3 -march=native -fopenmp). OpenMP
 * resolves to the libgomp PyTorch already loaded, so the kernel shares PyTorch's threads. */
#include <stdint.h>
#include <string.h>

#define LANES 16   /* floats per vector (one AVX-512 register, two AVX2 ones) */
#define NB 4       /* output rows per packed block (2 and 8 measured no better) */
#define RB 6       /* input rows per tile: 6 x NB accumulators + NB weights + 1 x = 29 of 32
                      registers, so a hybrid depth-1 verify (5 rows) is one pass over the weights */
#define GROUP 8    /* blocks per L2-resident group when there are more than RB rows */
#define PREFETCH 16 /* chunks ahead; of 0/4/8/16/32, 16 and 32 measured best on the 2-core host */

typedef float v16 __attribute__((vector_size(LANES * sizeof(float))));
/* the same vector read from any float address (x rows need not be 64-byte aligned) */
typedef float v16u __attribute__((vector_size(LANES * sizeof(float)), aligned(4), may_alias));

/* Only AVX-512 builds are used: a build emulating it in 256-bit registers timed slower than
 * oneDNN, so row_kernel.py keeps oneDNN there. */
int aurora_native_width(void) {
#ifdef __AVX512F__
  return 1;
#else
  return 0;
#endif
}

int64_t aurora_packed_floats(int64_t n, int64_t k) { return (n + NB - 1) / NB * NB * k; }

/* packed layout: [n/NB blocks][k/LANES chunks][NB rows][LANES], zero rows past n */
void aurora_pack(const float *w, int64_t n, int64_t k, float *out) {
  int64_t nblocks = (n + NB - 1) / NB, chunks = k / LANES;
  memset(out, 0, sizeof(float) * aurora_packed_floats(n, k));
  for (int64_t b = 0; b < nblocks; b++)
    for (int64_t c = 0; c < chunks; c++)
      for (int64_t j = 0; j < NB && b * NB + j < n; j++)
        memcpy(out + ((b * chunks + c) * NB + j) * LANES, w + (b * NB + j) * k + c * LANES,
               sizeof(float) * LANES);
}

typedef float v8 __attribute__((vector_size(8 * sizeof(float))));
typedef float v4 __attribute__((vector_size(4 * sizeof(float))));

/* The same 16 -> 1 tree for every output: halves added pairwise, in registers. */
static inline float tree_sum(v16 v) {
  v8 a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
         __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  v4 b = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
  return (b[0] + b[2]) + (b[1] + b[3]);
}

/* One block of NB outputs for R input rows. Each accumulator sees the same sequence of
 * multiply-adds for any R, so the tile size cannot change a result. */
#define TILE(R)                                                                           \
  static void tile##R(const float *wb, const float *x, int64_t k, int64_t chunks,         \
                      float out[RB][NB]) {                                                \
    v16 acc[R][NB];                                                                       \
    for (int r = 0; r < R; r++)                                                           \
      for (int j = 0; j < NB; j++) acc[r][j] = (v16){0};                                  \
    for (int64_t c = 0; c < chunks; c++) {                                                \
      const float *wc = wb + c * NB * LANES;                                              \
      for (int j = 0; j < NB; j++) __builtin_prefetch(wc + (PREFETCH * NB + j) * LANES);  \
      v16 wv[NB];                                                                         \
      for (int j = 0; j < NB; j++) wv[j] = *(const v16u *)(wc + j * LANES);               \
      for (int r = 0; r < R; r++) {                                                       \
        v16 xv = *(const v16u *)(x + r * k + c * LANES);                                  \
        for (int j = 0; j < NB; j++) acc[r][j] += wv[j] * xv;                             \
      }                                                                                   \
    }                                                                                     \
    for (int r = 0; r < R; r++)                                                           \
      for (int j = 0; j < NB; j++) out[r][j] = tree_sum(acc[r][j]);                       \
  }
TILE(1)
TILE(2)
TILE(3)
TILE(4)
TILE(5)
TILE(6)

/* Outputs of block b for input rows r0 .. r0 + RB - 1 (fewer at the end). */
static void block_rows(const float *x, int64_t rows, int64_t k, const float *packed, int64_t n,
                       const float *bias, float *y, int64_t b, int64_t r0) {
  int64_t chunks = k / LANES, rb = rows - r0 < RB ? rows - r0 : RB;
  const float *wb = packed + b * chunks * NB * LANES, *xr = x + r0 * k;
  float out[RB][NB];
  switch (rb) {
    case 1: tile1(wb, xr, k, chunks, out); break;
    case 2: tile2(wb, xr, k, chunks, out); break;
    case 3: tile3(wb, xr, k, chunks, out); break;
    case 4: tile4(wb, xr, k, chunks, out); break;
    case 5: tile5(wb, xr, k, chunks, out); break;
    default: tile6(wb, xr, k, chunks, out); break;
  }
  for (int64_t r = 0; r < rb; r++)
    for (int64_t j = 0; j < NB && b * NB + j < n; j++)
      y[(r0 + r) * n + b * NB + j] = out[r][j] + (bias ? bias[b * NB + j] : 0.0f);
}

/* Up to RB rows (a verify step): one pass over the weights from memory, blocks split between
 * threads. More rows (prefill, batches): groups of GROUP blocks stay in L2 while every tile of
 * RB rows, in L1, runs over them. Either way each output is the same tile's same sums, so the
 * loop order cannot change a result. */
void aurora_linear(const float *x, int64_t rows, int64_t k, const float *packed, int64_t n,
                   const float *bias, float *y, int threads) {
  int64_t nblocks = (n + NB - 1) / NB;
  if (rows <= RB) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t b = 0; b < nblocks; b++) block_rows(x, rows, k, packed, n, bias, y, b, 0);
    return;
  }
  int64_t groups = (nblocks + GROUP - 1) / GROUP;
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t g = 0; g < groups; g++)
    for (int64_t r0 = 0; r0 < rows; r0 += RB)
      for (int64_t b = g * GROUP; b < nblocks && b < (g + 1) * GROUP; b++)
        block_rows(x, rows, k, packed, n, bias, y, b, r0);
}
