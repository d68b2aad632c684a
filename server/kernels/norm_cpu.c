/* The elementwise work of a bf16 CPU step, each in one pass instead of several torch ops (F.rms_norm
 * alone is seven on CPU: ~20 us a call at one row, 61 calls a step for the default model). Rounded
 * where torch rounds, so the results are torch's but for the last bit of a sum taken in another order:
 *
 *   add_rms_norm:  x = bf16(x + delta) (skipped when delta is NULL);
 *                  out = bf16(x / sqrt(mean(x^2) + eps) * weight), all in fp32 (as ATen's CPU rms_norm);
 *   silu_mul:      out = bf16(bf16(silu(gate)) * up), silu in fp32 (exp.h's exp: ~2e-7 relative);
 *   rope_store:    q and k of a fused q/k/v row rotated in place (rotate-half RoPE over the whole head:
 *                  bf16(bf16(x * cos) + bf16(rotate_half(x) * sin)), as the torch ops round), then
 *                  the row's k and v written to its slot of a paged layer (bit for bit torch's).
 *
 * Rows are `stride` elements apart; values within a row are contiguous. Built and loaded like
 * lora_cpu.c (server/kernels/native.py). Returns 0, or -1 for bad sizes.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "bf16.h"
#include "exp.h"

int add_rms_norm_bf16(int64_t rows, int64_t dim, uint16_t *x, int64_t x_stride, const uint16_t *delta,
                      int64_t delta_stride, const uint16_t *weight, float eps, uint16_t *out, int64_t out_stride) {
    if (rows < 0 || dim < 1 || x_stride < dim || out_stride < dim || (delta && delta_stride < dim)) return -1;
    for (int64_t r = 0; r < rows; r++) {
        uint16_t *xr = x + r * x_stride;
        if (delta) {
            const uint16_t *dr = delta + r * delta_stride;
#pragma omp simd
            for (int64_t i = 0; i < dim; i++) xr[i] = f32_to_bf16(bf16_to_f32(xr[i]) + bf16_to_f32(dr[i]));
        }
        float squares = 0;
#pragma omp simd reduction(+ : squares)
        for (int64_t i = 0; i < dim; i++) squares += bf16_to_f32(xr[i]) * bf16_to_f32(xr[i]);
        float inverse = 1.0f / sqrtf(squares / (float)dim + eps);
        uint16_t *o = out + r * out_stride;
#pragma omp simd
        for (int64_t i = 0; i < dim; i++) {
            o[i] = f32_to_bf16(bf16_to_f32(xr[i]) * inverse * bf16_to_f32(weight[i]));
        }
    }
    return 0;
}

int silu_mul_bf16(int64_t rows, int64_t dim, const uint16_t *gate_up, int64_t stride, uint16_t *out,
                  int64_t out_stride) {
    if (rows < 0 || dim < 1 || stride < 2 * dim || out_stride < dim) return -1;
    for (int64_t r = 0; r < rows; r++) {
        const uint16_t *gate = gate_up + r * stride, *up = gate + dim;
        uint16_t *o = out + r * out_stride;
#pragma omp simd
        for (int64_t i = 0; i < dim; i++) {
            float g = bf16_to_f32(gate[i]);
            float e = exp_nonpositive(-fabsf(g));  /* silu(g) = g / (1 + e^-g), from e^-|g| without overflow */
            float silu = bf16_to_f32(f32_to_bf16(g >= 0 ? g / (1.0f + e) : g * e / (1.0f + e)));
            o[i] = f32_to_bf16(silu * bf16_to_f32(up[i]));
        }
    }
    return 0;
}

/* qkv: [tokens, (heads + 2 kv_heads) * dim] rows qkv_stride apart; cos, sin: [tokens, dim] contiguous;
 * k_cache, v_cache: [slots, kv_heads, dim]; slot_mapping: [tokens]. Returns -2 for a slot out of
 * bounds (nothing written for that token or after it). */
int rope_store_bf16(int64_t tokens, int64_t heads, int64_t kv_heads, int64_t dim, uint16_t *qkv, int64_t qkv_stride,
                    const uint16_t *cos, const uint16_t *sin, uint16_t *k_cache, uint16_t *v_cache, int64_t slots,
                    const int64_t *slot_mapping) {
    if (tokens < 0 || heads < 1 || kv_heads < 1 || dim < 2 || dim % 2 || qkv_stride < (heads + 2 * kv_heads) * dim)
        return -1;
    int64_t half = dim / 2;
    for (int64_t t = 0; t < tokens; t++) {
        int64_t slot = slot_mapping[t];
        if (slot < 0 || slot >= slots) return -2;
        uint16_t *row = qkv + t * qkv_stride;
        const uint16_t *c = cos + t * dim, *s = sin + t * dim;
        for (int64_t h = 0; h < heads + kv_heads; h++) {
            uint16_t *x = row + h * dim;
            uint16_t rotated[dim];
#pragma omp simd
            for (int64_t i = 0; i < half; i++) {
                float lo = bf16_to_f32(x[i]), hi = bf16_to_f32(x[i + half]);
                float a = bf16_to_f32(f32_to_bf16(lo * bf16_to_f32(c[i])));
                float b = bf16_to_f32(f32_to_bf16(-hi * bf16_to_f32(s[i])));
                float a2 = bf16_to_f32(f32_to_bf16(hi * bf16_to_f32(c[i + half])));
                float b2 = bf16_to_f32(f32_to_bf16(lo * bf16_to_f32(s[i + half])));
                rotated[i] = f32_to_bf16(a + b);
                rotated[i + half] = f32_to_bf16(a2 + b2);
            }
            memcpy(x, rotated, dim * sizeof *x);
        }
        memcpy(k_cache + slot * kv_heads * dim, row + heads * dim, kv_heads * dim * sizeof *row);
        memcpy(v_cache + slot * kv_heads * dim, row + (heads + kv_heads) * dim, kv_heads * dim * sizeof *row);
    }
    return 0;
}
