/* bf16 matmuls for CPU projections: y = x @ w.T (+ bias), fp32 accumulation, y rounded once; with
 * each row's LoRA delta folded into the same pass where a step has adapters (linear_lora).
 *
 * The weight is blocked once at load (server/kernels/native.py: LinearKernel.block) so that one
 * AVX512-BF16 instruction takes 16 outputs' weights for two inputs: [groups][in_pairs][64][2], a
 * group being 64 outputs (the last one zero-padded) and an odd `in` padded with a zero column. A
 * tile of up to 4 rows x 64 outputs keeps its 16 accumulators in registers while the group's
 * weights stream through once; each row's pair of inputs is broadcast. Rows beyond 4 re-read the
 * group from L2. Measured against oneDNN's prepacked bf16 weights on this model's shapes (one
 * thread): 1 row 9.4 -> 7.0 ms per pass (~38 GB/s, the core's streaming rate), 32 rows 25.7 ->
 * 22.5 ms, 512 rows 281 -> 254 ms (bench/linear_kernels.py).
 *
 * Tiles are shared among the caller's OpenMP team (torch's own libgomp, already loaded: the
 * engine's thread count holds here too). Built without AVX512-BF16, the entry points return -2
 * and the server keeps oneDNN.
 *
 *   x: [rows, in] bf16, rows x_stride apart, inputs contiguous;
 *   w: the blocked weight, ceil(out / 64) * ceil(in / 2) * 128 bf16;
 *   bias: NULL or ceil(out / 64) * 64 floats (zero-padded);
 *   y: [rows, out] bf16, rows y_stride apart.
 * Returns 0; -1 for bad sizes; -2 where this CPU or build has no AVX512-BF16.
 * linear_int8 (below): the same for weight-only int8 copies (`quantize: int8`).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define GROUP 64
#define TILE_ROWS 4
#define MAX_PARTS 4         /* linear_lora: parts of a fused projection (q/k/v, gate/up) */
#define SLOT 8              /* and packed columns per slot of its pool (an adapter takes whole slots) */
#define LORA_MAX_WIDTH 1024 /* and columns of one token */

/* A fused projection's packed adapters (built once per pool by server/kernels/native.py): each
 * adapter's A rows one run of memory, its B^T blocks another, read in order (the shrink's, then the
 * tiles' group by group), which the hardware prefetchers stream. */
typedef struct lora_pool {
    const uint16_t *a;  /* [cols][parts][in]: each adapter's A rows, its parts side by side */
    const uint16_t *b;  /* [cols / SLOT][groups][SLOT / 2][64][2]: B^T blocked like a weight, scale folded in */
    int64_t cols, parts, in, out;
    int64_t ends[MAX_PARTS]; /* each part's end in the output, multiples of 16 */
} lora_pool;

#if defined(__AVX512F__) && defined(__AVX512BF16__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include <immintrin.h>

#include "bf16.h"

static inline __m512bh input_pair(const uint16_t *row, int64_t pair, int64_t in) {
    uint32_t both = row[2 * pair];
    if (2 * pair + 1 < in) memcpy(&both, row + 2 * pair, sizeof both);  /* (an odd tail: the pad's weight is 0) */
    return (__m512bh)_mm512_set1_epi32((int32_t)both);
}

/* rows (1..4, a constant where inlined) x 64 outputs over every input pair of one group. */
static inline __attribute__((always_inline)) void accumulate(int rows, __m512 acc[TILE_ROWS][4], const uint16_t *wg,
                                                             int64_t pairs, int64_t full,
                                                             const uint16_t *const xs[TILE_ROWS], int64_t in) {
    for (int64_t k = 0; k < full; k++) {
        const uint16_t *wk = wg + k * 2 * GROUP;
        __m512bh w0 = (__m512bh)_mm512_loadu_si512(wk), w1 = (__m512bh)_mm512_loadu_si512(wk + 32);
        __m512bh w2 = (__m512bh)_mm512_loadu_si512(wk + 64), w3 = (__m512bh)_mm512_loadu_si512(wk + 96);
        for (int r = 0; r < rows; r++) {
            uint32_t both;
            memcpy(&both, xs[r] + 2 * k, sizeof both);
            __m512bh xb = (__m512bh)_mm512_set1_epi32((int32_t)both);
            acc[r][0] = _mm512_dpbf16_ps(acc[r][0], w0, xb);
            acc[r][1] = _mm512_dpbf16_ps(acc[r][1], w1, xb);
            acc[r][2] = _mm512_dpbf16_ps(acc[r][2], w2, xb);
            acc[r][3] = _mm512_dpbf16_ps(acc[r][3], w3, xb);
        }
    }
    for (int64_t k = full; k < pairs; k++) {  /* the odd input's pair */
        const uint16_t *wk = wg + k * 2 * GROUP;
        for (int r = 0; r < rows; r++) {
            __m512bh xb = input_pair(xs[r], k, in);
            for (int b = 0; b < 4; b++)
                acc[r][b] = _mm512_dpbf16_ps(acc[r][b], (__m512bh)_mm512_loadu_si512(wk + 32 * b), xb);
        }
    }
}

/* rows (1..4, a constant where inlined) x 64 outputs over every input of one int8 group: each input's
 * 64 weights widened to fp32 once for all rows. */
static inline __attribute__((always_inline)) void accumulate_int8(int rows, __m512 acc[TILE_ROWS][4], const int8_t *wg,
                                                                  int64_t in, const uint16_t *const xs[TILE_ROWS]) {
    for (int64_t i = 0; i < in; i++) {
        const int8_t *wi = wg + i * GROUP;
        __m512 w[4];
        for (int b = 0; b < 4; b++)
            w[b] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(wi + 16 * b))));
        for (int r = 0; r < rows; r++) {
            __m512 xb = _mm512_castsi512_ps(_mm512_set1_epi32((int32_t)((uint32_t)xs[r][i] << 16)));
            for (int b = 0; b < 4; b++) acc[r][b] = _mm512_fmadd_ps(w[b], xb, acc[r][b]);
        }
    }
}

/* A tile's weights: bf16 blocks, or int8 blocks with their scales. */
typedef struct {
    const void *w;
    const float *scales; /* NULL: bf16 */
    const float *bias;   /* or NULL */
} tile_weights;

/* A tile's LoRA: each row's shrink as bf16 pairs [parts][pairs] (NULL: the base model) and slots. */
typedef struct {
    const uint32_t *xa[TILE_ROWS];
    int32_t lo[TILE_ROWS], width[TILE_ROWS];
    const uint16_t *b;   /* the pool's blocked B^T */
    int64_t groups, pairs; /* output groups of the pool; xa's pairs per part */
    int part[4];         /* the part of each 16 outputs of the tile */
} tile_lora;

/* The delta of n rows (a constant where inlined) of one adapter over the tile's group g: per slot, per
 * pair of columns, one AVX512-BF16 instruction per 16 outputs (as the weights), the sums in
 * registers, then stored to delta[first..]. */
static inline __attribute__((always_inline)) void run_delta(int n, const tile_lora *lora, int first, int64_t g,
                                                            float delta[TILE_ROWS][GROUP]) {
    __m512 d[TILE_ROWS][4];
    for (int k = 0; k < n; k++)
        for (int b = 0; b < 4; b++) d[k][b] = _mm512_setzero_ps();
    int slots = lora->width[first] / SLOT;
    for (int s = 0; s < slots; s++) {
        const uint16_t *block = lora->b + ((lora->lo[first] / SLOT + s) * lora->groups + g) * (SLOT * GROUP);
        for (int q = 0; q < SLOT / 2; q++) {
            int64_t at = s * (SLOT / 2) + q;  /* the pair's place among the row's */
#pragma GCC unroll 4
            for (int b = 0; b < 4; b++) {
                __m512bh bv = (__m512bh)_mm512_loadu_si512(block + q * 2 * GROUP + 32 * b);
                for (int k = 0; k < n; k++) {
                    uint32_t pair = lora->xa[first + k][lora->part[b] * lora->pairs + at];
                    d[k][b] = _mm512_dpbf16_ps(d[k][b], bv, (__m512bh)_mm512_set1_epi32((int32_t)pair));
                }
            }
        }
    }
    for (int k = 0; k < n; k++)
        for (int b = 0; b < 4; b++) _mm512_storeu_ps(delta[first + k] + 16 * b, d[k][b]);
}

/* Each adapter row's delta for the tile's outputs, into delta[r] (fp32), rows of one adapter together:
 * the tile adds it as it rounds, so its own accumulators stay in registers. */
static __attribute__((noinline)) void tile_delta(int rows, const tile_lora *lora, int64_t g,
                                                 float delta[TILE_ROWS][GROUP]) {
    for (int r = 0; r < rows;) {
        int n = 1;
        while (r + n < rows && lora->xa[r + n] != NULL && lora->lo[r + n] == lora->lo[r]
               && lora->width[r + n] == lora->width[r])
            n++;
        if (lora->xa[r] != NULL) switch (n) {
                case 1: run_delta(1, lora, r, g, delta); break;
                case 2: run_delta(2, lora, r, g, delta); break;
                case 3: run_delta(3, lora, r, g, delta); break;
                default: run_delta(4, lora, r, g, delta);
            }
        r += n;
    }
}

/* rows (1..4) x up to 64 outputs of group g: xs and ys are the rows' inputs and outputs; lora NULL or
 * the rows' adapters. y = round(acc (* scale) + bias + delta). */
static void tile(int64_t rows, int64_t in, int64_t outputs, int64_t g, const tile_weights *tw,
                 const uint16_t *const xs[TILE_ROWS], uint16_t *const ys[TILE_ROWS], const tile_lora *lora) {
    __m512 acc[TILE_ROWS][4];
    for (int r = 0; r < TILE_ROWS; r++)
        for (int b = 0; b < 4; b++) acc[r][b] = _mm512_setzero_ps();
    if (tw->scales == NULL) {
        int64_t pairs = (in + 1) / 2, full = in / 2;
        const uint16_t *wg = (const uint16_t *)tw->w + g * pairs * 2 * GROUP;
        switch (rows) {
            case 1: accumulate(1, acc, wg, pairs, full, xs, in); break;
            case 2: accumulate(2, acc, wg, pairs, full, xs, in); break;
            case 3: accumulate(3, acc, wg, pairs, full, xs, in); break;
            default: accumulate(4, acc, wg, pairs, full, xs, in);
        }
    } else {
        const int8_t *wg = (const int8_t *)tw->w + g * in * GROUP;
        switch (rows) {
            case 1: accumulate_int8(1, acc, wg, in, xs); break;
            case 2: accumulate_int8(2, acc, wg, in, xs); break;
            case 3: accumulate_int8(3, acc, wg, in, xs); break;
            default: accumulate_int8(4, acc, wg, in, xs);
        }
    }
    float delta[TILE_ROWS][GROUP];
    if (lora != NULL) tile_delta((int)rows, lora, g, delta);
    for (int b = 0; b < 4; b++) {
        int64_t left = outputs - 16 * b;
        if (left <= 0) break;
        __mmask16 mask = left >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << left) - 1);
        __m512 add = tw->bias ? _mm512_loadu_ps(tw->bias + g * GROUP + 16 * b) : _mm512_setzero_ps();
        __m512 scale = tw->scales ? _mm512_loadu_ps(tw->scales + g * GROUP + 16 * b) : _mm512_set1_ps(1.0f);
        for (int r = 0; r < rows; r++) {
            __m512 sum = _mm512_fmadd_ps(acc[r][b], scale, add);
            if (lora != NULL && lora->xa[r] != NULL) sum = _mm512_add_ps(sum, _mm512_loadu_ps(delta[r] + 16 * b));
            _mm256_mask_storeu_epi16(ys[r] + 16 * b, mask, (__m256i)_mm512_cvtneps_pbh(sum));
        }
    }
}

static int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

/* Every tile of rows x out, in row order, without LoRA. */
static int plain(int64_t rows, int64_t in, int64_t out, const uint16_t *x, int64_t x_stride, const tile_weights *tw,
                 uint16_t *y, int64_t y_stride) {
    if (rows < 0 || in < 1 || out < 1 || x_stride < in || y_stride < out) return -1;
    int64_t groups = (out + GROUP - 1) / GROUP, chunks = (rows + TILE_ROWS - 1) / TILE_ROWS, tiles = groups * chunks;
    /* consecutive tiles share a group (its weights stay in the core's L2); a team splits them in runs */
#pragma omp parallel for schedule(static) if (tiles > 1 && rows * in * out >= (1 << 18))
    for (int64_t t = 0; t < tiles; t++) {
        int64_t g = t / chunks, r0 = t % chunks * TILE_ROWS, n = min64(rows - r0, TILE_ROWS);
        const uint16_t *xs[TILE_ROWS];
        uint16_t *ys[TILE_ROWS];
        for (int64_t r = 0; r < n; r++) xs[r] = x + (r0 + r) * x_stride, ys[r] = y + (r0 + r) * y_stride + g * GROUP;
        tile(n, in, min64(out - g * GROUP, GROUP), g, tw, xs, ys, NULL);
    }
    return 0;
}

int linear_bf16(int64_t rows, int64_t in, int64_t out, const uint16_t *x, int64_t x_stride, const uint16_t *w,
                const float *bias, uint16_t *y, int64_t y_stride) {
    tile_weights tw = {w, NULL, bias};
    return plain(rows, in, out, x, x_stride, &tw, y, y_stride);
}

/* Weight-only int8: w [groups][in][64] int8 (one scale per output, fp32), x bf16, fp32 sums. At 1-4
 * rows the step reads half the bytes of bf16 (decode is memory-bound there); past that the widening
 * costs more than it saves, and the caller keeps bf16.
 * w: ceil(out / 64) * in * 64 int8; scales, bias (or NULL): ceil(out / 64) * 64 floats. */
int linear_int8(int64_t rows, int64_t in, int64_t out, const uint16_t *x, int64_t x_stride, const int8_t *w,
                const float *scales, const float *bias, uint16_t *y, int64_t y_stride) {
    tile_weights tw = {w, scales, bias};
    return plain(rows, in, out, x, x_stride, &tw, y, y_stride);
}

/* ---- LoRA folded in ---- */

/* The shrink of up to 4 tokens of one adapter, each A row read once for all of them: the sum for
 * column c of part p, rounded to bf16 (as peft's lora_A output in bf16), into xa_k[p * pairs + c / 2]
 * as the pair (c, c + 1) the expand broadcasts. */
static inline __attribute__((always_inline)) void shrink_rows(int n, const uint16_t *const xs[TILE_ROWS],
                                                              const uint16_t *a, int64_t parts, int64_t in, int width,
                                                              uint32_t *const xa[TILE_ROWS], int64_t pairs) {
    for (int c = 0; c < width; c++)
        for (int64_t p = 0; p < parts; p++) {
            const uint16_t *ac = a + ((int64_t)c * parts + p) * in;
            __m512 acc[TILE_ROWS];
            for (int k = 0; k < TILE_ROWS; k++) acc[k] = _mm512_setzero_ps();
            int64_t i = 0;
            for (; i + 32 <= in; i += 32) {
                __m512bh av = (__m512bh)_mm512_loadu_si512(ac + i);
                for (int k = 0; k < n; k++)
                    acc[k] = _mm512_dpbf16_ps(acc[k], (__m512bh)_mm512_loadu_si512(xs[k] + i), av);
            }
            if (i < in) {  /* the last in % 32 inputs, the rest of the vector zeros */
                __mmask32 m = (__mmask32)((1ull << (in - i)) - 1);
                __m512bh av = (__m512bh)_mm512_maskz_loadu_epi16(m, ac + i);
                for (int k = 0; k < n; k++)
                    acc[k] = _mm512_dpbf16_ps(acc[k], (__m512bh)_mm512_maskz_loadu_epi16(m, xs[k] + i), av);
            }
            for (int k = 0; k < n; k++) {
                uint16_t *pair = (uint16_t *)&xa[k][p * pairs + c / 2];
                pair[c % 2] = f32_to_bf16(_mm512_reduce_add_ps(acc[k]));
            }
        }
}

/* Checks the tokens (order a permutation of the rows; each token's columns whole slots inside the
 * pool) and returns the widest token's width, or -3 (-4: no memory). */
static int64_t lora_tokens(int64_t rows, int64_t cols, const int32_t *lo, const int32_t *width, const int32_t *order) {
    unsigned char *seen = calloc(rows > 0 ? rows : 1, 1);
    if (seen == NULL) return -4;
    int64_t widest = 0;
    for (int64_t i = 0; i < rows; i++) {
        int64_t t = order[i];
        if (t < 0 || t >= rows || seen[t] || width[t] < 0 || width[t] > LORA_MAX_WIDTH || width[t] % SLOT != 0
            || (width[t] > 0 && (lo[t] < 0 || lo[t] % SLOT != 0 || (int64_t)lo[t] + width[t] > cols))) {
            widest = -3;
            break;
        }
        seen[t] = 1;
        if (width[t] > widest) widest = width[t];
    }
    free(seen);
    return widest;
}

/* The shrink of every adapter token into xa [rows][parts][pairs], in groups of up to 4 tokens of one
 * adapter taken in `order`; returns 0 or -4 (no memory). */
static int shrink_all(int64_t rows, const uint16_t *x, int64_t x_stride, const lora_pool *pool, const int32_t *lo,
                      const int32_t *width, const int32_t *order, uint32_t *xa, int64_t pairs) {
    int64_t *groups = malloc((rows > 0 ? rows : 1) * 2 * sizeof *groups), count = 0;  /* (first, tokens) */
    if (groups == NULL) return -4;
    for (int64_t i = 0; i < rows;) {
        int64_t t = order[i], n = 1;
        while (n < TILE_ROWS && i + n < rows && lo[order[i + n]] == lo[t] && width[order[i + n]] == width[t]) n++;
        if (width[t] > 0) groups[2 * count] = i, groups[2 * count + 1] = n, count++;
        i += n;
    }
    int64_t parts = pool->parts, in = pool->in;
#pragma omp parallel for schedule(static) if (count > 1 && rows * in * parts * pairs >= (1 << 17))
    for (int64_t g = 0; g < count; g++) {
        int64_t i = groups[2 * g], n = groups[2 * g + 1], t = order[i];
        const uint16_t *xs[TILE_ROWS];
        uint32_t *sums[TILE_ROWS];
        for (int64_t k = 0; k < n; k++) {
            xs[k] = x + order[i + k] * x_stride;
            sums[k] = xa + order[i + k] * parts * pairs;
        }
        const uint16_t *at = pool->a + (int64_t)lo[t] * parts * in;
        switch (n) {
            case 1: shrink_rows(1, xs, at, parts, in, width[t], sums, pairs); break;
            case 2: shrink_rows(2, xs, at, parts, in, width[t], sums, pairs); break;
            case 3: shrink_rows(3, xs, at, parts, in, width[t], sums, pairs); break;
            default: shrink_rows(4, xs, at, parts, in, width[t], sums, pairs);
        }
    }
    free(groups);
    return 0;
}

/* Every tile of rows x out with its rows' LoRA deltas: rows taken in `order`, so a tile's rows mostly
 * share an adapter. */
static void lora_tiles(int64_t rows, int64_t in, int64_t out, const uint16_t *x, int64_t x_stride,
                       const tile_weights *tw, uint16_t *y, int64_t y_stride, const lora_pool *pool,
                       const int32_t *lo, const int32_t *width, const int32_t *order, const uint32_t *xa,
                       int64_t pairs) {
    int64_t groups = (out + GROUP - 1) / GROUP, chunks = (rows + TILE_ROWS - 1) / TILE_ROWS, tiles = groups * chunks;
#pragma omp parallel for schedule(static) if (tiles > 1 && rows * in * out >= (1 << 18))
    for (int64_t t = 0; t < tiles; t++) {
        int64_t g = t / chunks, r0 = t % chunks * TILE_ROWS, n = min64(rows - r0, TILE_ROWS);
        tile_lora lora = {.b = pool->b, .groups = groups, .pairs = pairs};
        for (int b = 0; b < 4; b++) {
            int p = 0;
            while (p < pool->parts - 1 && g * GROUP + 16 * b >= pool->ends[p]) p++;
            lora.part[b] = p;
        }
        const uint16_t *xs[TILE_ROWS];
        uint16_t *ys[TILE_ROWS];
        int any = 0;
        for (int64_t r = 0; r < n; r++) {
            int64_t tok = order[r0 + r];
            xs[r] = x + tok * x_stride, ys[r] = y + tok * y_stride + g * GROUP;
            lora.xa[r] = width[tok] > 0 ? xa + tok * pool->parts * pairs : NULL;
            lora.lo[r] = lo[tok], lora.width[r] = width[tok];
            any |= width[tok] > 0;
        }
        tile(n, in, min64(out - g * GROUP, GROUP), g, tw, xs, ys, any ? &lora : NULL);
    }
}

/* linear_bf16 (scales NULL) or linear_int8 with each token's LoRA delta added before y is rounded: the
 * projection's parts share the packed adapters of `pool`; token t uses the columns [lo[t], lo[t] +
 * width[t]) (whole slots; width 0: the base model), taken in `order` (a permutation of the rows, by
 * adapter). Returns 0; -1 bad sizes; -2 no AVX512-BF16; -3 bad tokens (nothing written); -4 no memory. */
int linear_lora(int64_t rows, int64_t in, int64_t out, const uint16_t *x, int64_t x_stride, const void *w,
                const float *scales, const float *bias, uint16_t *y, int64_t y_stride, const lora_pool *pool,
                const int32_t *lo, const int32_t *width, const int32_t *order) {
    if (rows < 0 || in < 1 || out < 1 || x_stride < in || y_stride < out || pool->in != in || pool->out != out
        || pool->parts < 1 || pool->parts > MAX_PARTS || pool->ends[pool->parts - 1] != out || pool->cols % SLOT != 0)
        return -1;
    for (int64_t p = 0; p < pool->parts; p++)
        if (pool->ends[p] % 16 != 0 || pool->ends[p] <= (p > 0 ? pool->ends[p - 1] : 0)) return -1;
    int64_t widest = lora_tokens(rows, pool->cols, lo, width, order);
    if (widest < 0) return (int)widest;
    int64_t pairs = widest > 0 ? widest / 2 : 1;
    uint32_t *xa = malloc((rows > 0 ? rows : 1) * pool->parts * pairs * sizeof *xa);
    if (xa == NULL || shrink_all(rows, x, x_stride, pool, lo, width, order, xa, pairs) != 0) {
        free(xa);
        return -4;
    }
    tile_weights tw = {w, scales, bias};
    lora_tiles(rows, in, out, x, x_stride, &tw, y, y_stride, pool, lo, width, order, xa, pairs);
    free(xa);
    return 0;
}
#else
int linear_bf16(int64_t rows, int64_t in, int64_t out, const uint16_t *x, int64_t x_stride, const uint16_t *w,
                const float *bias, uint16_t *y, int64_t y_stride) {
    (void)rows, (void)in, (void)out, (void)x, (void)x_stride, (void)w, (void)bias, (void)y, (void)y_stride;
    return -2;
}

int linear_int8(int64_t rows, int64_t in, int64_t out, const uint16_t *x, int64_t x_stride, const int8_t *w,
                const float *scales, const float *bias, uint16_t *y, int64_t y_stride) {
    (void)rows, (void)in, (void)out, (void)x, (void)x_stride, (void)w, (void)scales, (void)bias, (void)y,
        (void)y_stride;
    return -2;
}

int linear_lora(int64_t rows, int64_t in, int64_t out, const uint16_t *x, int64_t x_stride, const void *w,
                const float *scales, const float *bias, uint16_t *y, int64_t y_stride, const lora_pool *pool,
                const int32_t *lo, const int32_t *width, const int32_t *order) {
    (void)rows, (void)in, (void)out, (void)x, (void)x_stride, (void)w, (void)scales, (void)bias, (void)y,
        (void)y_stride, (void)pool, (void)lo, (void)width, (void)order;
    return -2;
}
#endif
