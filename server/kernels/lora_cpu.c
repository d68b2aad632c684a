/* Per-token LoRA on CPU (BGMV): y[t] += (A[cols(t)] x[t]) . B^T[cols(t)] for each token t's own
 * packed columns, in one pass that reads only those columns. A batch of tokens over many adapters
 * costs each token its own rank, not the width of every adapter in the step (the masked window).
 *
 * Built by server/kernels/native.py with the system C compiler (-O3 -march=native) and loaded
 * with ctypes; plain C, no Python or torch headers. Products accumulate in fp32; a bf16 y is
 * rounded once, to nearest even, after the whole delta is added.
 *
 *   x: [tokens, in] rows x_stride apart; a: [cols, in] and b_t: [cols, out] contiguous (the pool);
 *   y: [tokens, out] rows y_stride apart (a column slice of a fused projection's output);
 *   lo, width: each token's first packed column and how many (0: the base model).
 * Returns 0, or -1 if a token is wider than MAX_WIDTH, -2 if its columns fall outside the cols
 * of a and b_t (nothing is read out of bounds; tokens before it have been added).
 */
#include <stdint.h>
#include <alloca.h>
#include <string.h>

#include "bf16.h"

#define MAX_WIDTH 1024
#define MAX_OUT (1 << 18) /* output features: the fp32 accumulator lives on the stack (1 MiB at most) */


/* The next token's adapter rows, asked for ahead (into L2) while this token is computed: a step
 * over several adapters reads each from memory, and the rows are too short for the hardware
 * prefetchers to ramp up. */
static void prefetch_rows(const void *start, int64_t bytes) {
    const char *p = start;
    for (int64_t i = 0; i < bytes; i += 64) __builtin_prefetch(p + i, 0, 2);
}

/* The shrink of one token: xa[c] = <x, a[c]> for its width columns, four columns per pass over x. */
#define SHRINK(T, LOAD)                                                                       \
    static void shrink_##T(const T *x, const T *a, int64_t in, int width, float *xa) {        \
        int c = 0;                                                                            \
        for (; c + 4 <= width; c += 4) {                                                      \
            const T *a0 = a + c * in, *a1 = a0 + in, *a2 = a1 + in, *a3 = a2 + in;            \
            float s0 = 0, s1 = 0, s2 = 0, s3 = 0;                                             \
            _Pragma("omp simd reduction(+:s0,s1,s2,s3)")                                      \
            for (int64_t i = 0; i < in; i++) {                                                \
                float v = LOAD(x[i]);                                                         \
                s0 += v * LOAD(a0[i]); s1 += v * LOAD(a1[i]);                                 \
                s2 += v * LOAD(a2[i]); s3 += v * LOAD(a3[i]);                                 \
            }                                                                                 \
            xa[c] = s0; xa[c + 1] = s1; xa[c + 2] = s2; xa[c + 3] = s3;                       \
        }                                                                                     \
        for (; c < width; c++) {                                                              \
            const T *ac = a + c * in;                                                         \
            float s = 0;                                                                      \
            _Pragma("omp simd reduction(+:s)")                                                \
            for (int64_t i = 0; i < in; i++) s += LOAD(x[i]) * LOAD(ac[i]);                   \
            xa[c] = s;                                                                        \
        }                                                                                     \
    }

SHRINK(float, AS_F32)
#if defined(__AVX512BF16__) && defined(__AVX512F__)
#include <immintrin.h>
/* With AVX512-BF16: 32 bf16 products per instruction, summed in fp32. */
static void shrink_uint16_t(const uint16_t *x, const uint16_t *a, int64_t in, int width, float *xa) {
    for (int c = 0; c < width; c++) {
        const uint16_t *ac = a + c * in;
        __m512 acc = _mm512_setzero_ps();
        int64_t i = 0;
        for (; i + 32 <= in; i += 32)
            acc = _mm512_dpbf16_ps(acc, (__m512bh)_mm512_loadu_si512(x + i), (__m512bh)_mm512_loadu_si512(ac + i));
        float s = _mm512_reduce_add_ps(acc);
        for (; i < in; i++) s += bf16_to_f32(x[i]) * bf16_to_f32(ac[i]);
        xa[c] = s;
    }
}
#else
SHRINK(uint16_t, bf16_to_f32)
#endif

/* The expand of one token: y += xa . b_t[width rows]. Each row of b_t is streamed whole into an
 * fp32 accumulator (one sequential read at a time, which the prefetchers keep up with; interleaving
 * the rows in blocks read ~11 GB/s), then y is updated once. */
#define EXPAND(T, LOAD, STORE)                                                                \
    static void expand_##T(const float *xa, const T *b, int64_t out, int width, T *y,         \
                           float *acc) {                                                      \
        memset(acc, 0, out * sizeof *acc);                                                    \
        int c = 0;                                                                            \
        for (; c + 4 <= width; c += 4) { /* four rows per pass over acc */                     \
            const T *b0 = b + c * out, *b1 = b0 + out, *b2 = b1 + out, *b3 = b2 + out;        \
            float s0 = xa[c], s1 = xa[c + 1], s2 = xa[c + 2], s3 = xa[c + 3];                 \
            _Pragma("omp simd")                                                               \
            for (int64_t j = 0; j < out; j++)                                                 \
                acc[j] += s0 * LOAD(b0[j]) + s1 * LOAD(b1[j]) + s2 * LOAD(b2[j]) + s3 * LOAD(b3[j]); \
        }                                                                                     \
        for (; c < width; c++) {                                                              \
            const T *bc = b + c * out;                                                        \
            float s = xa[c];                                                                  \
            _Pragma("omp simd")                                                               \
            for (int64_t j = 0; j < out; j++) acc[j] += s * LOAD(bc[j]);                      \
        }                                                                                     \
        _Pragma("omp simd")                                                                   \
        for (int64_t j = 0; j < out; j++) y[j] = STORE(LOAD(y[j]) + acc[j]);                  \
    }

EXPAND(uint16_t, bf16_to_f32, f32_to_bf16)
EXPAND(float, AS_F32, AS_F32)

#define BGMV(T)                                                                               \
    int lora_bgmv_##T(int64_t tokens, int64_t in, int64_t out, int64_t cols, const T *x,      \
                      int64_t x_stride, const T *a, const T *b_t, const int32_t *lo,          \
                      const int32_t *width, T *y, int64_t y_stride) {                         \
        float xa[MAX_WIDTH];                                                                  \
        if (out > MAX_OUT) return -3;                                                         \
        float *acc = alloca(out * sizeof(float));                                             \
        for (int64_t t = 0; t < tokens; t++) {                                                \
            int w = width[t];                                                                 \
            if (w <= 0) continue;                                                             \
            if (w > MAX_WIDTH) return -1;                                                     \
            if (lo[t] < 0 || (int64_t)lo[t] + w > cols) return -2;                            \
            if (t + 1 < tokens && width[t + 1] > 0 && lo[t + 1] != lo[t]                      \
                && lo[t + 1] >= 0 && (int64_t)lo[t + 1] + width[t + 1] <= cols) {             \
                prefetch_rows(a + (int64_t)lo[t + 1] * in, width[t + 1] * in * sizeof(T));    \
                prefetch_rows(b_t + (int64_t)lo[t + 1] * out, width[t + 1] * out * sizeof(T)); \
            }                                                                                 \
            shrink_##T(x + t * x_stride, a + (int64_t)lo[t] * in, in, w, xa);                 \
            expand_##T(xa, b_t + (int64_t)lo[t] * out, out, w, y + t * y_stride, acc);        \
        }                                                                                     \
        return 0;                                                                             \
    }

BGMV(uint16_t)
BGMV(float)
