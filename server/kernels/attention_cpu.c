/* Decode attention over a paged KV cache on CPU: one new query token per sequence, its keys and
 * values read in place through the slots it attends over (no gathered copies), every query head
 * sharing a KV head served by one read of that head's rows.
 *
 * Scores, softmax and the weighted sum of values are fp32 (as ATen's flash kernel computes them;
 * it also keeps the probabilities in fp32 here); a bf16 output is rounded once. Built and loaded
 * like lora_cpu.c (server/kernels/native.py).
 *
 *   q: [seqs, heads, dim], rows q_stride apart (a head's dim values contiguous, heads dim apart);
 *   k, v: [slots, kv_heads, dim] contiguous (one layer of the pool);
 *   gather: [seqs, attend_len] int64, the slot of each position (only the first lens[s] are read);
 *   window: sliding window in keys (the query's own included), 0: the whole context;
 *   out: [seqs, heads, dim] contiguous; scratch: at least (heads / kv_heads) * attend_len floats.
 * Returns 0, -1 for a shape it does not handle (dim > 256, more than 16 query heads per KV head), -2 for a
 * slot or length out of bounds (nothing is read out of bounds; rows before it are written).
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "bf16.h"
#include "exp.h"

#define MAX_DIM 256
#define MAX_GROUP 16




#define ATTEND(T, LOAD, STORE)                                                                       \
    int paged_decode_attention_##T(int64_t seqs, int64_t heads, int64_t kv_heads, int64_t dim,        \
                                   const T *q, int64_t q_stride, const T *k, const T *v, int64_t slots, \
                                   const int64_t *gather, int64_t attend_len, const int64_t *lens,    \
                                   int64_t window, float scale, T *out, float *scratch) {             \
        int64_t group = heads / kv_heads;                                                            \
        if (dim > MAX_DIM || group > MAX_GROUP || group * kv_heads != heads) return -1;              \
        float qf[MAX_GROUP][MAX_DIM];                                                                \
        float acc[MAX_GROUP][MAX_DIM];                                                               \
        for (int64_t s = 0; s < seqs; s++) {                                                         \
            int64_t len = lens[s];                                                                   \
            if (len < 1 || len > attend_len) return -2;                                              \
            int64_t first = window > 0 && len > window ? len - window : 0;                           \
            const int64_t *where = gather + s * attend_len;                                          \
            for (int64_t l = first; l < len; l++)                                                    \
                if (where[l] < 0 || where[l] >= slots) return -2;                                    \
            for (int64_t h = 0; h < kv_heads; h++) {                                                 \
                for (int64_t g = 0; g < group; g++) {                                                \
                    const T *qrow = q + s * q_stride + (h * group + g) * dim;                        \
                    for (int64_t d = 0; d < dim; d++) qf[g][d] = LOAD(qrow[d]) * scale;              \
                }                                                                                    \
                for (int64_t l = first; l < len; l++) { /* scores: each key row read once */         \
                    const T *krow = k + (where[l] * kv_heads + h) * dim;                             \
                    float kf[MAX_DIM];                                                               \
                    _Pragma("omp simd")                                                              \
                    for (int64_t d = 0; d < dim; d++) kf[d] = LOAD(krow[d]);                         \
                    for (int64_t g = 0; g < group; g++) {                                            \
                        float sum = 0;                                                               \
                        _Pragma("omp simd reduction(+:sum)")                                         \
                        for (int64_t d = 0; d < dim; d++) sum += qf[g][d] * kf[d];                   \
                        scratch[g * attend_len + l] = sum;                                           \
                    }                                                                                \
                }                                                                                    \
                for (int64_t g = 0; g < group; g++) { /* softmax, unnormalised */                    \
                    float *p = scratch + g * attend_len, top = -INFINITY, total = 0;                 \
                    for (int64_t l = first; l < len; l++) top = p[l] > top ? p[l] : top;             \
                    _Pragma("omp simd reduction(+:total)")                                           \
                    for (int64_t l = first; l < len; l++) {                                          \
                        p[l] = exp_nonpositive(p[l] - top);                                          \
                        total += p[l];                                                               \
                    }                                                                                \
                    float inv = 1.0f / total;                                                        \
                    for (int64_t l = first; l < len; l++) p[l] *= inv;                               \
                    memset(acc[g], 0, dim * sizeof(float));                                          \
                }                                                                                    \
                for (int64_t l = first; l < len; l++) { /* values: each row read once */             \
                    const T *vrow = v + (where[l] * kv_heads + h) * dim;                             \
                    float vf[MAX_DIM];                                                               \
                    _Pragma("omp simd")                                                              \
                    for (int64_t d = 0; d < dim; d++) vf[d] = LOAD(vrow[d]);                         \
                    for (int64_t g = 0; g < group; g++) {                                            \
                        float w = scratch[g * attend_len + l];                                       \
                        _Pragma("omp simd")                                                          \
                        for (int64_t d = 0; d < dim; d++) acc[g][d] += w * vf[d];                    \
                    }                                                                                \
                }                                                                                    \
                for (int64_t g = 0; g < group; g++) {                                                \
                    T *orow = out + (s * heads + h * group + g) * dim;                               \
                    for (int64_t d = 0; d < dim; d++) orow[d] = STORE(acc[g][d]);                    \
                }                                                                                    \
            }                                                                                        \
        }                                                                                            \
        return 0;                                                                                    \
    }

ATTEND(uint16_t, bf16_to_f32, f32_to_bf16)
ATTEND(float, AS_F32, AS_F32)

#if defined(__AVX512BF16__) && defined(__AVX512F__)
#include <immintrin.h>
/* The same for bf16 with AVX512-BF16, for head sizes a multiple of 32: q . k as exact bf16 products
 * summed in fp32 (what a bf16 GEMM computes) then scaled; values converted once per row. */
int paged_decode_attention_bf16_avx512(int64_t seqs, int64_t heads, int64_t kv_heads, int64_t dim,
                                       const uint16_t *q, int64_t q_stride, const uint16_t *k, const uint16_t *v,
                                       int64_t slots, const int64_t *gather, int64_t attend_len,
                                       const int64_t *lens, int64_t window, float scale, uint16_t *out,
                                       float *scratch) {
    int64_t group = heads / kv_heads;
    if (dim > MAX_DIM || dim % 32 || group > MAX_GROUP || group * kv_heads != heads)
        return paged_decode_attention_uint16_t(seqs, heads, kv_heads, dim, q, q_stride, k, v, slots, gather,
                                               attend_len, lens, window, scale, out, scratch);
    int64_t chunks = dim / 32;
    __m512 acc[MAX_GROUP][MAX_DIM / 16];
    for (int64_t s = 0; s < seqs; s++) {
        int64_t len = lens[s];
        if (len < 1 || len > attend_len) return -2;
        int64_t first = window > 0 && len > window ? len - window : 0;
        const int64_t *where = gather + s * attend_len;
        for (int64_t l = first; l < len; l++)
            if (where[l] < 0 || where[l] >= slots) return -2;
        for (int64_t h = 0; h < kv_heads; h++) {
            const uint16_t *qh = q + s * q_stride + h * group * dim;
            for (int64_t l = first; l < len; l++) {
                const uint16_t *krow = k + (where[l] * kv_heads + h) * dim;
                for (int64_t g = 0; g < group; g++) {
                    __m512 sum = _mm512_setzero_ps();
                    for (int64_t c = 0; c < chunks; c++)
                        sum = _mm512_dpbf16_ps(sum, (__m512bh)_mm512_loadu_si512(qh + g * dim + 32 * c),
                                               (__m512bh)_mm512_loadu_si512(krow + 32 * c));
                    scratch[g * attend_len + l] = _mm512_reduce_add_ps(sum) * scale;
                }
            }
            for (int64_t g = 0; g < group; g++) {
                float *p = scratch + g * attend_len, top = -INFINITY, total = 0;
                for (int64_t l = first; l < len; l++) top = p[l] > top ? p[l] : top;
                #pragma omp simd reduction(+:total)
                for (int64_t l = first; l < len; l++) {
                    p[l] = exp_nonpositive(p[l] - top);
                    total += p[l];
                }
                float inv = 1.0f / total;
                for (int64_t l = first; l < len; l++) p[l] *= inv;
                for (int64_t c = 0; c < dim / 16; c++) acc[g][c] = _mm512_setzero_ps();
            }
            for (int64_t l = first; l < len; l++) {
                const uint16_t *vrow = v + (where[l] * kv_heads + h) * dim;
                for (int64_t c = 0; c < dim / 16; c++) {
                    __m512 vf = _mm512_castsi512_ps(_mm512_slli_epi32(
                        _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(vrow + 16 * c))), 16));
                    for (int64_t g = 0; g < group; g++)
                        acc[g][c] = _mm512_fmadd_ps(_mm512_set1_ps(scratch[g * attend_len + l]), vf, acc[g][c]);
                }
            }
            for (int64_t g = 0; g < group; g++) {
                uint16_t *orow = out + (s * heads + h * group + g) * dim;
                float tmp[16];
                for (int64_t c = 0; c < dim / 16; c++) {
                    _mm512_storeu_ps(tmp, acc[g][c]);
                    for (int d = 0; d < 16; d++) orow[16 * c + d] = f32_to_bf16(tmp[d]);
                }
            }
        }
    }
    return 0;
}
#else
int paged_decode_attention_bf16_avx512(int64_t seqs, int64_t heads, int64_t kv_heads, int64_t dim,
                                       const uint16_t *q, int64_t q_stride, const uint16_t *k, const uint16_t *v,
                                       int64_t slots, const int64_t *gather, int64_t attend_len,
                                       const int64_t *lens, int64_t window, float scale, uint16_t *out,
                                       float *scratch) {
    return paged_decode_attention_uint16_t(seqs, heads, kv_heads, dim, q, q_stride, k, v, slots, gather,
                                           attend_len, lens, window, scale, out, scratch);
}
#endif
