/* Per-token LoRA on CPU (BGMV): y[t] += (A[cols(t)] x[t]) . B^T[cols(t)] for each token t's own
 * packed columns, in one pass that reads only those columns. A batch of tokens over many adapters
 * costs each token its own rank, not the width of every adapter in the step (the masked window).
 *
 * Built by server/kernels/native.py with the system C compiler (-O3 -march=native) and loaded
 * with ctypes; plain C, no Python or torch headers. Products accumulate in fp32; a bf16 y is
 * rounded once, to nearest even, after the whole delta is added.
 *
 *   x: [tokens, in] rows x_stride apart; a: [cols, in] rows a_stride apart and b_t: [cols, out] rows
 *   b_stride apart (a part's view of a fused projection's pool);
 *   y: [tokens, out] rows y_stride apart (a column slice of a fused projection's output);
 *   lo, width: each token's first packed column and how many (0: the base model).
 * order: the tokens in the order to take them (each once; the planner groups them by adapter).
 * Returns 0, or -1 if a token is wider than MAX_WIDTH (or order names no token), -2 if its columns
 * fall outside the cols of a and b_t (nothing is read out of bounds; tokens before it have been
 * added), -3 if out is over MAX_OUT, a stride is shorter than its row, or the accumulator can't be
 * allocated.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16.h"

#define MAX_WIDTH 1024
#define MAX_OUT (1 << 20) /* output features */
#define GROUP 4           /* tokens of one adapter expanded together */
#if defined(__AVX512F__) && defined(__AVX512BF16__)
#define GROUP_FOR_ONE 1   /* the register-blocked group expand is faster even for one token */
#else
#define GROUP_FOR_ONE 0
#endif


/* The next token's adapter rows, asked for ahead (into L2) while this token is computed: a step
 * over several adapters reads each from memory, and the rows are too short for the hardware
 * prefetchers to ramp up. */
static void prefetch_rows(const void *start, int rows, int64_t row_bytes, int64_t stride_bytes) {
    for (int r = 0; r < rows; r++) {
        const char *p = (const char *)start + r * stride_bytes;
        for (int64_t i = 0; i < row_bytes; i += 64) __builtin_prefetch(p + i, 0, 2);
    }
}

/* The shrink of one token: xa[c] = <x, a[c]> for its width columns, four columns per pass over x. */
#define SHRINK(T, LOAD)                                                                       \
    static void shrink_##T(const T *x, const T *a, int64_t in, int64_t sa, int width, float *xa) { \
        int c = 0;                                                                            \
        for (; c + 4 <= width; c += 4) {                                                      \
            const T *a0 = a + c * sa, *a1 = a0 + sa, *a2 = a1 + sa, *a3 = a2 + sa;            \
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
            const T *ac = a + c * sa;                                                         \
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
static void shrink_uint16_t(const uint16_t *x, const uint16_t *a, int64_t in, int64_t sa, int width, float *xa) {
    for (int c = 0; c < width; c++) {
        const uint16_t *ac = a + c * sa;
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

/* The expand of one token: y += xa . b_t[width rows], each row of b_t streamed whole into an fp32
 * accumulator, then y updated once (the generic path; with AVX512-BF16 every group, even of one
 * token, takes the register-blocked expand below). */
#define EXPAND(T, LOAD, STORE)                                                                \
    static void expand_##T(const float *xa, const T *b, int64_t out, int64_t sb, int width,   \
                           T *y, float *acc) {                                                \
        memset(acc, 0, out * sizeof *acc);                                                    \
        for (int c = 0; c < width; c++) {                                                     \
            const T *bc = b + c * sb;                                                         \
            float s = xa[c];                                                                  \
            _Pragma("omp simd")                                                               \
            for (int64_t j = 0; j < out; j++) acc[j] += s * LOAD(bc[j]);                      \
        }                                                                                     \
        _Pragma("omp simd")                                                                   \
        for (int64_t j = 0; j < out; j++) y[j] = STORE(LOAD(y[j]) + acc[j]);                  \
    }

EXPAND(uint16_t, bf16_to_f32, f32_to_bf16)
EXPAND(float, AS_F32, AS_F32)

/* The expand of up to GROUP tokens of one adapter at once: each b_t value is loaded (and
 * converted) once for all of them. xa holds GROUP rows of MAX_WIDTH (zeros past n). */
#define EXPAND_GROUP(T, LOAD, STORE)                                                          \
    static void expand_group_##T(const float *xa, int n, const T *b, int64_t out, int64_t sb, \
                                 int width, T *const *ys, float *acc) {                       \
        memset(acc, 0, GROUP * out * sizeof *acc);                                            \
        float *a0 = acc, *a1 = a0 + out, *a2 = a1 + out, *a3 = a2 + out;                      \
        for (int c = 0; c < width; c++) {                                                     \
            const T *bc = b + c * sb;                                                         \
            float s0 = xa[c], s1 = xa[MAX_WIDTH + c], s2 = xa[2 * MAX_WIDTH + c],             \
                  s3 = xa[3 * MAX_WIDTH + c];                                                 \
            _Pragma("omp simd")                                                               \
            for (int64_t j = 0; j < out; j++) {                                               \
                float bv = LOAD(bc[j]);                                                       \
                a0[j] += s0 * bv; a1[j] += s1 * bv; a2[j] += s2 * bv; a3[j] += s3 * bv;       \
            }                                                                                 \
        }                                                                                     \
        for (int k = 0; k < n; k++) {                                                         \
            T *y = ys[k];                                                                     \
            const float *ak = acc + k * out;                                                  \
            _Pragma("omp simd")                                                               \
            for (int64_t j = 0; j < out; j++) y[j] = STORE(LOAD(y[j]) + ak[j]);               \
        }                                                                                     \
    }

#if defined(__AVX512F__) && defined(__AVX512BF16__)
/* The group expand with its accumulators in registers: 64 output columns of GROUP tokens (16 zmm)
 * per pass over the adapter's rows, each b_t value loaded once for all of them. */
static inline __m512 load16(const uint16_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}
static inline void store16(uint16_t *p, __m512 v) { _mm256_storeu_si256((__m256i *)p, (__m256i)_mm512_cvtneps_pbh(v)); }
static inline __m512 load16f(const float *p) { return _mm512_loadu_ps(p); }
static inline void store16f(float *p, __m512 v) { _mm512_storeu_ps(p, v); }

#define EXPAND_GROUP_AVX512(T, LOADV, STOREV, LOAD, STORE)                                     \
    static void expand_group_##T(const float *xa, int n, const T *b, int64_t out, int64_t sb, \
                                 int width, T *const *ys, float *unused) {                    \
        (void)unused;                                                                         \
        int64_t j0 = 0;                                                                       \
        for (; j0 + 64 <= out; j0 += 64) {                                                    \
            __m512 acc[GROUP][4];                                                             \
            for (int k = 0; k < GROUP; k++)                                                   \
                for (int q = 0; q < 4; q++) acc[k][q] = _mm512_setzero_ps();                  \
            for (int c = 0; c < width; c++) {                                                 \
                const T *bc = b + c * sb + j0;                                                \
                __m512 bv[4];                                                                 \
                for (int q = 0; q < 4; q++) bv[q] = LOADV(bc + 16 * q);                       \
                for (int k = 0; k < GROUP; k++) {                                             \
                    __m512 s = _mm512_set1_ps(xa[k * MAX_WIDTH + c]);                         \
                    for (int q = 0; q < 4; q++) acc[k][q] = _mm512_fmadd_ps(s, bv[q], acc[k][q]); \
                }                                                                             \
            }                                                                                 \
            for (int k = 0; k < n; k++)                                                       \
                for (int q = 0; q < 4; q++) {                                                 \
                    T *y = ys[k] + j0 + 16 * q;                                               \
                    STOREV(y, _mm512_add_ps(LOADV(y), acc[k][q]));                            \
                }                                                                             \
        }                                                                                     \
        for (int64_t j = j0; j < out; j++) { /* the last out % 64 columns */                  \
            float sum[GROUP] = {0};                                                           \
            for (int c = 0; c < width; c++)                                                   \
                for (int k = 0; k < GROUP; k++) sum[k] += xa[k * MAX_WIDTH + c] * LOAD(b[c * sb + j]); \
            for (int k = 0; k < n; k++) ys[k][j] = STORE(LOAD(ys[k][j]) + sum[k]);            \
        }                                                                                     \
    }

EXPAND_GROUP_AVX512(uint16_t, load16, store16, bf16_to_f32, f32_to_bf16)
EXPAND_GROUP_AVX512(float, load16f, store16f, AS_F32, AS_F32)
#else
EXPAND_GROUP(uint16_t, bf16_to_f32, f32_to_bf16)
EXPAND_GROUP(float, AS_F32, AS_F32)
#endif

/* Tokens are taken in `order` (the planner sorts them by adapter), GROUP of one adapter at a time. */
#define BGMV(T)                                                                               \
    int lora_bgmv_##T(int64_t tokens, int64_t in, int64_t out, int64_t cols, const T *x,      \
                      int64_t x_stride, const T *a, int64_t a_stride, const T *b_t,           \
                      int64_t b_stride, const int32_t *lo, const int32_t *width,              \
                      const int32_t *order, T *y, int64_t y_stride) {                         \
        float xa[GROUP * MAX_WIDTH];                                                          \
        if (out > MAX_OUT || a_stride < in || b_stride < out) return -3;                      \
        float *acc = malloc(GROUP * out * sizeof(float));                                     \
        if (acc == NULL) return -3;                                                           \
        int rc = 0;                                                                           \
        for (int64_t i = 0; i < tokens;) {                                                    \
            int64_t t = order[i];                                                             \
            int w = t >= 0 && t < tokens ? width[t] : -1;                                     \
            if (w == 0) { i++; continue; }                                                    \
            if (w < 0 || w > MAX_WIDTH) { rc = -1; break; }                                   \
            if (lo[t] < 0 || (int64_t)lo[t] + w > cols) { rc = -2; break; }                   \
            int n = 1;                                                                        \
            while (n < GROUP && i + n < tokens && order[i + n] >= 0 && order[i + n] < tokens  \
                   && lo[order[i + n]] == lo[t] && width[order[i + n]] == w) n++;             \
            if (i + n < tokens) { /* the next adapter's rows, fetched while these compute */   \
                int64_t u = order[i + n];                                                     \
                if (u >= 0 && u < tokens && width[u] > 0 && lo[u] != lo[t] && lo[u] >= 0     \
                    && (int64_t)lo[u] + width[u] <= cols) {                                   \
                    prefetch_rows(a + (int64_t)lo[u] * a_stride, width[u], in * sizeof(T),    \
                                  a_stride * sizeof(T));                                      \
                    prefetch_rows(b_t + (int64_t)lo[u] * b_stride, width[u], out * sizeof(T), \
                                  b_stride * sizeof(T));                                      \
                }                                                                             \
            }                                                                                 \
            const T *at = a + (int64_t)lo[t] * a_stride, *bt = b_t + (int64_t)lo[t] * b_stride; \
            if (n == 1 && !GROUP_FOR_ONE) {                                                   \
                shrink_##T(x + t * x_stride, at, in, a_stride, w, xa);                        \
                expand_##T(xa, bt, out, b_stride, w, y + t * y_stride, acc);                  \
            } else {                                                                          \
                T *ys[GROUP];                                                                 \
                for (int k = n; k < GROUP; k++) memset(xa + k * MAX_WIDTH, 0, w * sizeof(float)); \
                for (int k = 0; k < n; k++) {                                                 \
                    int64_t tk = order[i + k];                                                \
                    shrink_##T(x + tk * x_stride, at, in, a_stride, w, xa + k * MAX_WIDTH);   \
                    ys[k] = y + tk * y_stride;                                                \
                }                                                                             \
                expand_group_##T(xa, n, bt, out, b_stride, w, ys, acc);                       \
            }                                                                                 \
            i += n;                                                                           \
        }                                                                                     \
        free(acc);                                                                            \
        return rc;                                                                            \
    }

BGMV(uint16_t)
BGMV(float)
