/* Row-independent float32 linear for CPU decode and verify steps (row_kernel.py says why).
 *
 * y[r, n] = sum_k x[r, k] * w[n, k] (+ bias[n]). Every output is reduced in one fixed order, a
 * single multiply-add chain over k from k = 0, whatever the number of rows in the call and
 * whichever thread computes it. So a row's result never depends on the rows beside it, which is
 * what keeps a verify step's logits equal to a one-token step's.
 *
 * Layout: the weights are packed once into blocks of NB = 32 outputs, [block][k][32], so a block
 * is one sequential stream. The tile keeps RB input rows x 32 outputs in registers: per k it loads
 * two weight vectors, broadcasts one x value per row, and does 2 x RB multiply-adds (12 rows: 24
 * accumulators + 2 weights + 1 broadcast = 27 of 32 registers, 14 loads per 24 multiply-adds).
 * A verify step of up to 12 rows therefore reads the weights from memory once and is bound by
 * the multiply-adds, not by loads: on the 2-core AVX512-BF16 host it timed 25-35% faster for
 * 5-16 rows than the former design (16-lane partial sums over k, 6 x 4 tiles, 26-28 loads per 24
 * multiply-adds) and within that host's noise for 1 row (numbers in row_kernel.py).
 *
 * With AVX2 (16 registers of 8 floats) the same code builds 16-output blocks and 6-row tiles (12
 * accumulators + 2 weights + 1 broadcast = 15 of 16 registers). Its results are the same chains,
 * so the same bits. On a 2-core AVX2-only EPYC it read a SmolLM2-135M forward's linears in 32-38
 * ms for 1-6 rows, against 54-69 ms for both MKL (1 row) and oneDNN packed.
 *
 * Draft heads may store their copies in bfloat16 instead (aurora_linear_bf16): the same blocks
 * and chains, each weight widened to float32 in registers, half the bytes read. Never a target's
 * weights: rounding them would change the output.
 *
 * Built by row_kernel.py with the system C compiler (-O3 -march=native -fopenmp). OpenMP
 * resolves to the libgomp PyTorch already loaded, so the kernel shares PyTorch's threads. */
#include <stdint.h>
#include <string.h>

#ifdef __AVX512F__
#define LANES 16   /* floats per vector (one AVX-512 register) */
#define RB_NATIVE 12 /* 24 accumulators + 2 weights + 1 broadcast of 32 registers */
#else
#define LANES 8    /* AVX2: one 256-bit register */
#define RB_NATIVE 6  /* 12 accumulators + 2 weights + 1 broadcast of 16 registers */
#endif
#define NV 2       /* vectors of outputs per block */
#define NB (NV * LANES)
#ifndef RB
#define RB RB_NATIVE /* input rows per tile (-DRB=N builds another, for comparisons) */
#endif
#define MAX_RB 12  /* the widest tile defined below */
_Static_assert(RB >= 1 && RB <= MAX_RB, "RB must be 1..12");
#define GROUP 4    /* blocks per L2-resident group when there are more than RB rows */
#define PREFETCH 32 /* k steps ahead (4 KiB); 16, 32 and 64 measured alike on the 2-core host */
/* Tiles of FAR_ROWS rows or more also prefetch FAR k steps ahead (16 KiB) into L2. Why: from 5
 * rows on a k step's multiply-adds take about as long as its weights take to arrive, and a 4 KiB
 * lead no longer hid the memory; a SmolLM2-135M verify of 5-8 tokens cost 1.10-1.12x one token
 * where 2-4 tokens cost 1.01x, and 5 and 7 rows cost more than 6. With the far prefetch 5, 7
 * and 8 tokens took 3-11% less on two threads (6 the same), 7 and 8 tokens 8-16% less on one,
 * 1-4 tokens the same (python scripts/verify_shapes.py --threads 2,1 --sizes 1,4,5,6,7,8
 * --rounds 40 --baseline-row-kernel OLD.c). For fewer rows it cost about what it gained: their
 * loop is a pure stream, which the hardware prefetcher already runs ahead of. Prefetches change
 * no result. */
#define FAR_ROWS 5
#define FAR (4 * PREFETCH)

typedef float v16 __attribute__((vector_size(LANES * sizeof(float))));  /* one register */
/* the same vector read from any float address */
typedef float v16u __attribute__((vector_size(LANES * sizeof(float)), aligned(4), may_alias));
/* LANES pairs of bfloat16 weights read from any address as 32-bit words */
typedef uint32_t u32v __attribute__((vector_size(LANES * sizeof(uint32_t))));
typedef uint32_t u32u __attribute__((vector_size(LANES * sizeof(uint32_t)), aligned(2),
                                     may_alias));

/* Weight loads of one k step's NV vectors: float32 as stored, or bfloat16 (the upper half of
 * the float32 it stands for) stored in pairs, output j of the block's first vector in a word's
 * low half and output j of the second in its high half (aurora_pack_bf16), so one load, one
 * shift and one mask widen both. The multiply-adds are float32 either way. */
_Static_assert(NV == 2, "bfloat16 weights come in pairs: one per vector");
static inline void load_f32(const float *p, v16 wv[NV]) {
  for (int j = 0; j < NV; j++) wv[j] = *(const v16u *)(p + j * LANES);
}
static inline void load_bf16(const uint16_t *p, v16 wv[NV]) {
  u32v pair = *(const u32u *)p;
  wv[0] = (v16)(pair << 16);
  wv[1] = (v16)(pair & 0xffff0000u);
}

/* Builds that use native registers: AVX-512, or AVX2 with FMA (each at its own tile size). An
 * earlier kernel that emulated 512-bit vectors in 256-bit registers ran out of registers and
 * timed slower than oneDNN; without either, row_kernel.py keeps oneDNN. */
int aurora_native_width(void) {
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
  return 1;
#else
  return 0;
#endif
}

/* the tile this build uses (input rows), so a comparison can tell builds apart */
int aurora_tile_rows(void) { return RB; }

/* elements of a packed copy (floats, or bfloat16s for aurora_pack_bf16) */
int64_t aurora_packed_floats(int64_t n, int64_t k) { return (n + NB - 1) / NB * NB * k; }

/* packed layout: [n/NB blocks][k][NB], zero outputs past n */
void aurora_pack(const float *w, int64_t n, int64_t k, float *out) {
  int64_t nblocks = (n + NB - 1) / NB;
  memset(out, 0, sizeof(float) * aurora_packed_floats(n, k));
  for (int64_t b = 0; b < nblocks; b++)
    for (int64_t j = 0; j < NB && b * NB + j < n; j++)
      for (int64_t c = 0; c < k; c++) out[(b * k + c) * NB + j] = w[(b * NB + j) * k + c];
}

/* bfloat16 weights (rounded by the caller): the same blocks, each k step's outputs j and
 * LANES + j side by side (load_bf16) */
void aurora_pack_bf16(const uint16_t *w, int64_t n, int64_t k, uint16_t *out) {
  int64_t nblocks = (n + NB - 1) / NB;
  memset(out, 0, sizeof(uint16_t) * aurora_packed_floats(n, k));
  for (int64_t b = 0; b < nblocks; b++)
    for (int64_t j = 0; j < NB && b * NB + j < n; j++) {
      int64_t slot = j < LANES ? 2 * j : 2 * (j - LANES) + 1;
      for (int64_t c = 0; c < k; c++) out[(b * k + c) * NB + slot] = w[(b * NB + j) * k + c];
    }
}

/* One block of NB outputs for R input rows, weights of type WT read by LOAD. Each accumulator
 * sees the same sequence of multiply-adds for any R, so the tile size cannot change a result. */
#define TILE(NAME, WT, LOAD, R)                                                             \
  static void NAME##R(const void *wb_, const float *x, int64_t k, v16 out[MAX_RB][NV]) {    \
    const WT *wb = (const WT *)wb_;                                                       \
    v16 acc[R][NV];                                                                       \
    for (int r = 0; r < R; r++)                                                           \
      for (int j = 0; j < NV; j++) acc[r][j] = (v16){0};                                  \
    for (int64_t c = 0; c < k; c++) {                                                     \
      const WT *wc = wb + c * NB;                                                         \
      for (int j = 0; j < NV; j++) {                                                      \
        __builtin_prefetch(wc + PREFETCH * NB + j * LANES);                               \
        if (R >= FAR_ROWS) __builtin_prefetch(wc + FAR * NB + j * LANES, 0, 2); /* to L2 */ \
      }                                                                                   \
      v16 wv[NV];                                                                         \
      LOAD(wc, wv);                                                                       \
      for (int r = 0; r < R; r++) {                                                       \
        float xs = x[r * k + c];                                                          \
        for (int j = 0; j < NV; j++) acc[r][j] += wv[j] * xs;                             \
      }                                                                                   \
    }                                                                                     \
    for (int r = 0; r < R; r++)                                                           \
      for (int j = 0; j < NV; j++) out[r][j] = acc[r][j];                                 \
  }
#define TILES_OF(NAME, WT, LOAD)                                                            \
  TILE(NAME, WT, LOAD, 1) TILE(NAME, WT, LOAD, 2) TILE(NAME, WT, LOAD, 3)                   \
  TILE(NAME, WT, LOAD, 4) TILE(NAME, WT, LOAD, 5) TILE(NAME, WT, LOAD, 6)                   \
  TILE(NAME, WT, LOAD, 7) TILE(NAME, WT, LOAD, 8) TILE(NAME, WT, LOAD, 9)                   \
  TILE(NAME, WT, LOAD, 10) TILE(NAME, WT, LOAD, 11) TILE(NAME, WT, LOAD, 12)

typedef void (*tile_fn)(const void *, const float *, int64_t, v16[MAX_RB][NV]);
TILES_OF(tile_f32_, float, load_f32)
TILES_OF(tile_bf16_, uint16_t, load_bf16)
static const tile_fn TILES_F32[MAX_RB + 1] = {
    0, tile_f32_1, tile_f32_2, tile_f32_3, tile_f32_4, tile_f32_5, tile_f32_6,
    tile_f32_7, tile_f32_8, tile_f32_9, tile_f32_10, tile_f32_11, tile_f32_12};
static const tile_fn TILES_BF16[MAX_RB + 1] = {
    0, tile_bf16_1, tile_bf16_2, tile_bf16_3, tile_bf16_4, tile_bf16_5, tile_bf16_6,
    tile_bf16_7, tile_bf16_8, tile_bf16_9, tile_bf16_10, tile_bf16_11, tile_bf16_12};

/* Outputs of block b for input rows r0 .. r0 + RB - 1 (fewer at the end); ``esize`` is the
 * size of one packed weight (4: float32, 2: bfloat16). */
static void block_rows(const float *x, int64_t rows, int64_t k, const char *packed, int esize,
                       const tile_fn *tiles, int64_t n, const float *bias, float *y, int64_t b,
                       int64_t r0) {
  int64_t rb = rows - r0 < RB ? rows - r0 : RB, m = n - b * NB < NB ? n - b * NB : NB;
  v16 out[MAX_RB][NV];
  tiles[rb](packed + b * k * NB * esize, x + r0 * k, k, out);
  for (int64_t r = 0; r < rb; r++) {
    const float *o = (const float *)out[r];
    float *yr = y + (r0 + r) * n + b * NB;
    for (int64_t j = 0; j < m; j++) yr[j] = o[j] + (bias ? bias[b * NB + j] : 0.0f);
  }
}

/* Up to RB rows (a verify step): one pass over the weights from memory, blocks split between
 * threads. More rows (prefill, batches): groups of GROUP blocks stay in L2 while every tile of
 * RB rows runs over them. Either way each output is the same tile's same chain, so the loop
 * order cannot change a result. */
static void linear(const float *x, int64_t rows, int64_t k, const char *packed, int esize,
                   const tile_fn *tiles, int64_t n, const float *bias, float *y, int threads) {
  int64_t nblocks = (n + NB - 1) / NB;
  if (rows <= 0) return; /* an empty call: nothing to write */
  if (rows <= RB) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t b = 0; b < nblocks; b++)
      block_rows(x, rows, k, packed, esize, tiles, n, bias, y, b, 0);
    return;
  }
  int64_t groups = (nblocks + GROUP - 1) / GROUP;
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t g = 0; g < groups; g++)
    for (int64_t r0 = 0; r0 < rows; r0 += RB)
      for (int64_t b = g * GROUP; b < nblocks && b < (g + 1) * GROUP; b++)
        block_rows(x, rows, k, packed, esize, tiles, n, bias, y, b, r0);
}

void aurora_linear(const float *x, int64_t rows, int64_t k, const float *packed, int64_t n,
                   const float *bias, float *y, int threads) {
  linear(x, rows, k, (const char *)packed, sizeof(float), TILES_F32, n, bias, y, threads);
}

/* Weights stored as bfloat16 (half the bytes a step reads), multiplied in float32: for draft
 * heads, whose precision changes which tokens they propose, never an output. The packed layout
 * is the float32 one's, in bfloat16 (aurora_pack_bf16). */
void aurora_linear_bf16(const float *x, int64_t rows, int64_t k, const uint16_t *packed,
                        int64_t n, const float *bias, float *y, int threads) {
  linear(x, rows, k, (const char *)packed, sizeof(uint16_t), TILES_BF16, n, bias, y, threads);
}
