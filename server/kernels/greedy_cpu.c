/* Greedy sampling of fp32 logits rows on CPU: each row's argmax (the first, among equal maxima)
 * and its log-probability -log(sum(exp(x - max))), in two vectorized passes over the row.
 *
 * torch's batched max with indices scans a row without vectors (32 rows of 49,152 logits: ~1.3 ms,
 * then ~1.5 ms of sub, clamp, exp and sum); here the argmax keeps 16 running maxima and their
 * positions, and the sum uses exp.h's exp (no denormals: differences are clamped at -80, as the
 * torch path does). A row holding a NaN returns -1 and the caller keeps torch's ops for the step.
 *
 *   logits: [rows, vocab], rows `stride` floats apart; tokens: [rows] int64; logprobs: [rows] float.
 * Returns 0, -1 for a row with a NaN, -2 where it was built without AVX-512.
 */
#include <math.h>
#include <stdint.h>

#include "exp.h"

#if defined(__AVX512F__)
#include <immintrin.h>

static int64_t row_argmax(const float *row, int64_t vocab, float *best_value) {
    __m512 best = _mm512_set1_ps(-INFINITY);
    __m512i where = _mm512_setzero_si512(), index = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13,
                                                                     14, 15);
    __mmask16 nan = 0;
    const __m512i sixteen = _mm512_set1_epi32(16);
    for (int64_t i = 0; i < vocab; i += 16) {
        __mmask16 valid = vocab - i >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (vocab - i)) - 1);
        __m512 v = _mm512_mask_loadu_ps(_mm512_set1_ps(-INFINITY), valid, row + i);
        nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
        __mmask16 larger = _mm512_cmp_ps_mask(v, best, _CMP_GT_OQ);  /* strictly: each lane keeps its first */
        best = _mm512_mask_mov_ps(best, larger, v);
        where = _mm512_mask_mov_epi32(where, larger, index);
        index = _mm512_add_epi32(index, sixteen);
    }
    if (nan) return -1;
    float top = _mm512_reduce_max_ps(best);
    __mmask16 at_top = _mm512_cmp_ps_mask(best, _mm512_set1_ps(top), _CMP_EQ_OQ);
    int32_t first = _mm512_mask_reduce_min_epi32(at_top, where);  /* the earliest of equal maxima */
    *best_value = top;
    return first;
}

int greedy_rows(int64_t rows, int64_t vocab, const float *logits, int64_t stride, int64_t *tokens, float *logprobs) {
    if (rows < 0 || vocab < 1 || vocab > INT32_MAX || stride < vocab) return -1;
    for (int64_t r = 0; r < rows; r++) {
        const float *row = logits + r * stride;
        float top;
        int64_t token = row_argmax(row, vocab, &top);
        if (token < 0) return -1;
        float sum = 0;
        if (top == INFINITY) {  /* torch's path: exp(inf - inf) is NaN */
            sum = NAN;
        } else {
#pragma omp simd reduction(+ : sum)
            for (int64_t i = 0; i < vocab; i++) sum += exp_nonpositive(row[i] - top);
        }
        tokens[r] = token;
        logprobs[r] = -logf(sum);
    }
    return 0;
}
#else
int greedy_rows(int64_t rows, int64_t vocab, const float *logits, int64_t stride, int64_t *tokens, float *logprobs) {
    (void)rows, (void)vocab, (void)logits, (void)stride, (void)tokens, (void)logprobs;
    return -2;
}
#endif
