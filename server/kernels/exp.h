/* A vectorizable exp for the kernels' softmaxes. */
#ifndef LORASERVE_EXP_H
#define LORASERVE_EXP_H
#include <stdint.h>
#include <string.h>

/* exp(x) for x <= 0 in fp32 (a softmax's shifted scores), vectorizable: x = n ln2 + r, a degree-6
 * polynomial for e^r on |r| <= ln2 / 2, 2^n through the exponent bits. Relative error ~2e-7.
 * At or below -80 it returns 0 (e^-80 ~ 1.8e-35, below any sum's rounding), and no lane ever
 * computes a denormal: those are ~100x slower on x86. */
static inline float exp_nonpositive(float x) {
    float clamped = x >= -80.0f ? x : -80.0f;  /* (a NaN fails the test: clamped, and returned as is below) */
    /* n = round(clamped / ln2) by the 1.5 * 2^23 trick: vectorizes (roundf's half-away-from-zero has
     * no AVX-512 instruction, so a loop calling it stays scalar: ~3.4 ns an exp instead of ~0.2) */
    float n = (clamped * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
    float r = clamped - n * 0.693359375f + n * 2.12194440e-4f;
    float p = 1.0f + r * (1.0f + r * (0.5f + r * (0.166666672f + r * (0.0416664891f + r * (0.00833336823f
                   + r * 0.00139304355f)))));
    uint32_t bits = (uint32_t)((int32_t)n + 127) << 23;  /* n in [-115, 0]: a normal power of two */
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return x != x ? x : (x <= -80.0f ? 0.0f : p * scale);
}
#endif
