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
#include <string.h>

#define BLOCK 64     /* output columns accumulated in registers at a time */
#define MAX_WIDTH 1024

static inline float bf16_to_f32(uint16_t v) {
    uint32_t u = (uint32_t)v << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u); /* NaN stays NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
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

#define AS_F32(v) (v)
SHRINK(uint16_t, bf16_to_f32)
SHRINK(float, AS_F32)

/* The expand of one token: y += xa . b_t[width rows], BLOCK output columns at a time. */
#define EXPAND(T, LOAD, STORE)                                                                \
    static void expand_##T(const float *xa, const T *b, int64_t out, int width, T *y) {       \
        for (int64_t j0 = 0; j0 < out; j0 += BLOCK) {                                         \
            int64_t n = out - j0 < BLOCK ? out - j0 : BLOCK;                                  \
            float acc[BLOCK] = {0};                                                           \
            for (int c = 0; c < width; c++) {                                                 \
                const T *bc = b + c * out + j0;                                               \
                float s = xa[c];                                                              \
                _Pragma("omp simd")                                                           \
                for (int64_t j = 0; j < n; j++) acc[j] += s * LOAD(bc[j]);                    \
            }                                                                                 \
            for (int64_t j = 0; j < n; j++) y[j0 + j] = STORE(LOAD(y[j0 + j]) + acc[j]);      \
        }                                                                                     \
    }

EXPAND(uint16_t, bf16_to_f32, f32_to_bf16)
EXPAND(float, AS_F32, AS_F32)

#define BGMV(T)                                                                               \
    int lora_bgmv_##T(int64_t tokens, int64_t in, int64_t out, int64_t cols, const T *x,      \
                      int64_t x_stride, const T *a, const T *b_t, const int32_t *lo,          \
                      const int32_t *width, T *y, int64_t y_stride) {                         \
        float xa[MAX_WIDTH];                                                                  \
        for (int64_t t = 0; t < tokens; t++) {                                                \
            int w = width[t];                                                                 \
            if (w <= 0) continue;                                                             \
            if (w > MAX_WIDTH) return -1;                                                     \
            if (lo[t] < 0 || (int64_t)lo[t] + w > cols) return -2;                            \
            shrink_##T(x + t * x_stride, a + (int64_t)lo[t] * in, in, w, xa);                 \
            expand_##T(xa, b_t + (int64_t)lo[t] * out, out, w, y + t * y_stride);             \
        }                                                                                     \
        return 0;                                                                             \
    }

BGMV(uint16_t)
BGMV(float)
