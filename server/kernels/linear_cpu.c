/* bf16 matmuls for CPU projections: y = x @ w.T (+ bias), fp32 accumulation, y rounded once.
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
 * engine's thread count holds here too). Built without AVX512-BF16, the entry point returns -2
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
#include <string.h>

#define GROUP 64
#define TILE_ROWS 4

#if defined(__AVX512F__) && defined(__AVX512BF16__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include <immintrin.h>

static inline __m512bh input_pair(const uint16_t *row, int64_t pair, int64_t in) {
    uint32_t both = row[2 * pair];
    if (2 * pair + 1 < in) memcpy(&both, row + 2 * pair, sizeof both);  /* (an odd tail: the pad's weight is 0) */
    return (__m512bh)_mm512_set1_epi32((int32_t)both);
}

/* rows (1..4, a constant where inlined) x 64 outputs over every input pair of one group. */
static inline __attribute__((always_inline)) void accumulate(int rows, __m512 acc[TILE_ROWS][4], const uint16_t *wg,
                                                             int64_t pairs, int64_t full, const uint16_t *x,
                                                             int64_t x_stride, int64_t in) {
    for (int64_t k = 0; k < full; k++) {
        const uint16_t *wk = wg + k * 2 * GROUP;
        __m512bh w0 = (__m512bh)_mm512_loadu_si512(wk), w1 = (__m512bh)_mm512_loadu_si512(wk + 32);
        __m512bh w2 = (__m512bh)_mm512_loadu_si512(wk + 64), w3 = (__m512bh)_mm512_loadu_si512(wk + 96);
        for (int r = 0; r < rows; r++) {
            uint32_t both;
            memcpy(&both, x + r * x_stride + 2 * k, sizeof both);
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
            __m512bh xb = input_pair(x + r * x_stride, k, in);
            for (int b = 0; b < 4; b++)
                acc[r][b] = _mm512_dpbf16_ps(acc[r][b], (__m512bh)_mm512_loadu_si512(wk + 32 * b), xb);
        }
    }
}

static void tile(int64_t rows, int64_t in, int64_t outputs, const uint16_t *wg, const float *bias,
                 const uint16_t *x, int64_t x_stride, uint16_t *y, int64_t y_stride) {
    __m512 acc[TILE_ROWS][4];
    for (int r = 0; r < TILE_ROWS; r++)
        for (int b = 0; b < 4; b++) acc[r][b] = _mm512_setzero_ps();
    int64_t pairs = (in + 1) / 2, full = in / 2;
    switch (rows) {
        case 1: accumulate(1, acc, wg, pairs, full, x, x_stride, in); break;
        case 2: accumulate(2, acc, wg, pairs, full, x, x_stride, in); break;
        case 3: accumulate(3, acc, wg, pairs, full, x, x_stride, in); break;
        default: accumulate(4, acc, wg, pairs, full, x, x_stride, in);
    }
    for (int b = 0; b < 4; b++) {
        int64_t left = outputs - 16 * b;
        if (left <= 0) break;
        __mmask16 mask = left >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << left) - 1);
        __m512 add = bias ? _mm512_loadu_ps(bias + 16 * b) : _mm512_setzero_ps();
        for (int r = 0; r < rows; r++) {
            __m256i rounded = (__m256i)_mm512_cvtneps_pbh(_mm512_add_ps(acc[r][b], add));
            _mm256_mask_storeu_epi16(y + r * y_stride + 16 * b, mask, rounded);
        }
    }
}

int linear_bf16(int64_t rows, int64_t in, int64_t out, const uint16_t *x, int64_t x_stride, const uint16_t *w,
                const float *bias, uint16_t *y, int64_t y_stride) {
    if (rows < 0 || in < 1 || out < 1 || x_stride < in || y_stride < out) return -1;
    int64_t groups = (out + GROUP - 1) / GROUP, chunks = (rows + TILE_ROWS - 1) / TILE_ROWS;
    int64_t group_size = (in + 1) / 2 * 2 * GROUP, tiles = groups * chunks;
    /* consecutive tiles share a group (its weights stay in the core's L2); a team splits them in runs */
#pragma omp parallel for schedule(static) if (tiles > 1 && rows * in * out >= (1 << 18))
    for (int64_t t = 0; t < tiles; t++) {
        int64_t g = t / chunks, r0 = t % chunks * TILE_ROWS;
        int64_t n = rows - r0 < TILE_ROWS ? rows - r0 : TILE_ROWS;
        int64_t outputs = out - g * GROUP < GROUP ? out - g * GROUP : GROUP;
        tile(n, in, outputs, w + g * group_size, bias ? bias + g * GROUP : NULL, x + r0 * x_stride, x_stride,
             y + r0 * y_stride + g * GROUP, y_stride);
    }
    return 0;
}

/* Weight-only int8: w [groups][in][64] int8 (one scale per output, fp32), x bf16, fp32 sums. Each
 * input's 64 weights are widened to fp32 once per tile of up to 4 rows: at 1-4 rows the step reads
 * half the bytes of bf16 (decode is memory-bound there); past that the widening costs more than it
 * saves, and the caller keeps bf16. */
/* rows (1..4, a constant where inlined) x 64 outputs over every input of one int8 group. */
static inline __attribute__((always_inline)) void accumulate_int8(int rows, __m512 acc[TILE_ROWS][4], const int8_t *wg,
                                                                  int64_t in, const uint16_t *x, int64_t x_stride) {
    for (int64_t i = 0; i < in; i++) {
        const int8_t *wi = wg + i * GROUP;
        __m512 w[4];
        for (int b = 0; b < 4; b++)
            w[b] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(wi + 16 * b))));
        for (int r = 0; r < rows; r++) {
            __m512 xb = _mm512_castsi512_ps(_mm512_set1_epi32((int32_t)((uint32_t)x[r * x_stride + i] << 16)));
            for (int b = 0; b < 4; b++) acc[r][b] = _mm512_fmadd_ps(w[b], xb, acc[r][b]);
        }
    }
}

static void tile_int8(int64_t rows, int64_t in, int64_t outputs, const int8_t *wg, const float *scales,
                      const float *bias, const uint16_t *x, int64_t x_stride, uint16_t *y, int64_t y_stride) {
    __m512 acc[TILE_ROWS][4];
    for (int r = 0; r < TILE_ROWS; r++)
        for (int b = 0; b < 4; b++) acc[r][b] = _mm512_setzero_ps();
    switch (rows) {
        case 1: accumulate_int8(1, acc, wg, in, x, x_stride); break;
        case 2: accumulate_int8(2, acc, wg, in, x, x_stride); break;
        case 3: accumulate_int8(3, acc, wg, in, x, x_stride); break;
        default: accumulate_int8(4, acc, wg, in, x, x_stride);
    }
    for (int b = 0; b < 4; b++) {
        int64_t left = outputs - 16 * b;
        if (left <= 0) break;
        __mmask16 mask = left >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << left) - 1);
        __m512 scale = _mm512_loadu_ps(scales + 16 * b);
        __m512 add = bias ? _mm512_loadu_ps(bias + 16 * b) : _mm512_setzero_ps();
        for (int r = 0; r < rows; r++) {
            __m256i rounded = (__m256i)_mm512_cvtneps_pbh(_mm512_fmadd_ps(acc[r][b], scale, add));
            _mm256_mask_storeu_epi16(y + r * y_stride + 16 * b, mask, rounded);
        }
    }
}

/* w: ceil(out / 64) * in * 64 int8; scales, bias (or NULL): ceil(out / 64) * 64 floats. */
int linear_int8(int64_t rows, int64_t in, int64_t out, const uint16_t *x, int64_t x_stride, const int8_t *w,
                const float *scales, const float *bias, uint16_t *y, int64_t y_stride) {
    if (rows < 0 || in < 1 || out < 1 || x_stride < in || y_stride < out) return -1;
    int64_t groups = (out + GROUP - 1) / GROUP, chunks = (rows + TILE_ROWS - 1) / TILE_ROWS, tiles = groups * chunks;
#pragma omp parallel for schedule(static) if (tiles > 1 && rows * in * out >= (1 << 18))
    for (int64_t t = 0; t < tiles; t++) {
        int64_t g = t / chunks, r0 = t % chunks * TILE_ROWS;
        int64_t n = rows - r0 < TILE_ROWS ? rows - r0 : TILE_ROWS;
        int64_t outputs = out - g * GROUP < GROUP ? out - g * GROUP : GROUP;
        tile_int8(n, in, outputs, w + g * in * GROUP, scales + g * GROUP, bias ? bias + g * GROUP : NULL,
                  x + r0 * x_stride, x_stride, y + r0 * y_stride + g * GROUP, y_stride);
    }
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
#endif
