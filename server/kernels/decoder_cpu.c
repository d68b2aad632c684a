/* A decode step's layers of a Llama-shaped bf16 model in one call: for each layer the same kernels,
 * in the same order, on the same values as the Python layer loop (model/decoder.py), so the result is
 * bit for bit the same; what goes is ~270 Python calls a step with their checks and allocations (~3.5
 * ms of a 17 ms step at one row). The kernels are linear_cpu.c's, norm_cpu.c's and attention_cpu.c's,
 * reached through function pointers the caller (native.py:DecodeLayers) takes from their libraries.
 *
 * Per layer, x the residual stream [rows, hidden] and pending the last block's output:
 *   normed = rms_norm(x += pending) * in_norm           (add_rms_norm; nothing added at layer 0)
 *   qkv = normed @ W_qkv (+ each row's LoRA)            (linear_bf16 / linear_int8 / linear_lora)
 *   q, k rotated, k and v written to the paged cache    (rope_store)
 *   attn = attention over each row's slots              (paged_decode_attention)
 *   pending = attn @ W_o
 *   normed = rms_norm(x += pending) * post_norm
 *   pending = silu(normed @ W_gate) * (normed @ W_up) @ W_down
 * The caller adds the last pending to x (as the Python stream does) before the final norm.
 * Returns 0; -1 - 100 x the layer whose shapes are not the step's (checked before anything runs); or,
 * negated, the failing kernel's code plus 10 x its place (1 linear, 2 norm, 3 rope, 4 silu, 5
 * attention) plus 100 x the layer: nothing is undone, and the caller fails the pass. */
#include <stddef.h>
#include <stdint.h>

typedef int (*linear_fn)(int64_t rows, int64_t in, int64_t out, const uint16_t *x, int64_t x_stride,
                         const void *w, const float *bias, uint16_t *y, int64_t y_stride);
typedef int (*int8_fn)(int64_t rows, int64_t in, int64_t out, const uint16_t *x, int64_t x_stride, const void *w,
                       const float *scales, const float *bias, uint16_t *y, int64_t y_stride);
typedef int (*lora_fn)(int64_t rows, int64_t in, int64_t out, const uint16_t *x, int64_t x_stride, const void *w,
                       const float *scales, const float *bias, uint16_t *y, int64_t y_stride, const void *pool,
                       const int32_t *lo, const int32_t *width, const int32_t *order);
typedef int (*norm_fn)(int64_t rows, int64_t dim, uint16_t *x, int64_t x_stride, const uint16_t *delta,
                       int64_t delta_stride, const uint16_t *weight, float eps, uint16_t *out, int64_t out_stride);
typedef int (*silu_fn)(int64_t rows, int64_t dim, const uint16_t *gate_up, int64_t stride, uint16_t *out,
                       int64_t out_stride);
typedef int (*rope_fn)(int64_t tokens, int64_t heads, int64_t kv_heads, int64_t dim, uint16_t *qkv,
                       int64_t qkv_stride, const uint16_t *cos, const uint16_t *sin, uint16_t *k_cache,
                       uint16_t *v_cache, int64_t slots, const int64_t *slot_mapping);
typedef int (*attention_fn)(int64_t seqs, int64_t heads, int64_t kv_heads, int64_t dim, const uint16_t *q,
                            int64_t q_stride, const uint16_t *k, const uint16_t *v, int64_t slots,
                            const int64_t *gather, int64_t attend_len, const int64_t *lens, int64_t window,
                            float scale, uint16_t *out, float *scratch);

typedef struct {
    linear_fn linear;
    int8_fn int8;
    lora_fn lora;
    norm_fn norm;
    silu_fn silu;
    rope_fn rope;
    attention_fn attention;
} kernels;

typedef struct {
    const void *w;        /* blocked bf16 weight, or the int8 copy's blocks */
    const float *scales;  /* the int8 copy's scales; NULL: w is bf16 */
    const float *bias;    /* padded fp32, or NULL */
    const void *pool;     /* linear_cpu.c's lora_pool for this step's adapters, or NULL: no LoRA here */
    int64_t in, out;
} projection;

typedef struct {
    const uint16_t *in_norm, *post_norm;  /* [hidden] */
    projection qkv, o, gate_up, down;
    uint16_t *k_cache, *v_cache;          /* [slots, kv_heads, dim] */
    int64_t window;                       /* 0: none */
} layer;

typedef struct {
    int64_t rows, hidden, heads, kv_heads, dim, intermediate, slots, attend_len;
    float eps, scale;
    uint16_t *x, *normed, *qkv, *attn, *o_out, *gate_up, *act, *down_out;  /* [rows, their widths] */
    const uint16_t *cos, *sin;                /* [rows, 1, dim] */
    const int64_t *slot_mapping, *gather, *lens;
    float *scratch;                           /* the attention's: (heads / kv_heads) x attend_len */
    const int32_t *lo, *width, *order;        /* the LoRA step's rows (NULL: no LoRA this step) */
} step;

static int project(const kernels *k, const step *s, const projection *p, const uint16_t *x, uint16_t *y) {
    if (p->pool != NULL)
        return k->lora(s->rows, p->in, p->out, x, p->in, p->w, p->scales, p->bias, y, p->out, p->pool, s->lo,
                       s->width, s->order);
    if (p->scales != NULL)
        return k->int8(s->rows, p->in, p->out, x, p->in, p->w, p->scales, p->bias, y, p->out);
    return k->linear(s->rows, p->in, p->out, x, p->in, p->w, p->bias, y, p->out);
}

#define CHECK(call, place)                                     \
    do {                                                       \
        int rc_ = (call);                                      \
        if (rc_ != 0) return rc_ - 10 * (place) - 100 * (int)i; \
    } while (0)

int decode_layers(const kernels *k, const step *s, const layer *layers, int64_t count) {
    if (s->rows < 1 || s->hidden < 1 || s->heads < 1 || s->kv_heads < 1 || s->dim < 1 || count < 1) return -1;
    const int64_t qkv_width = (s->heads + 2 * s->kv_heads) * s->dim, q_width = s->heads * s->dim;
    for (int64_t i = 0; i < count; i++) {  /* every layer's shapes before any layer runs */
        const layer *l = &layers[i];
        if (l->qkv.in != s->hidden || l->qkv.out != qkv_width || l->o.in != q_width || l->o.out != s->hidden
            || l->gate_up.in != s->hidden || l->gate_up.out != 2 * s->intermediate
            || l->down.in != s->intermediate || l->down.out != s->hidden)
            return -1 - 100 * (int)i;
    }
    for (int64_t i = 0; i < count; i++) {
        const layer *l = &layers[i];
        CHECK(k->norm(s->rows, s->hidden, s->x, s->hidden, i > 0 ? s->down_out : NULL, s->hidden, l->in_norm,
                      s->eps, s->normed, s->hidden), 2);
        CHECK(project(k, s, &l->qkv, s->normed, s->qkv), 1);
        CHECK(k->rope(s->rows, s->heads, s->kv_heads, s->dim, s->qkv, qkv_width, s->cos, s->sin, l->k_cache,
                      l->v_cache, s->slots, s->slot_mapping), 3);
        CHECK(k->attention(s->rows, s->heads, s->kv_heads, s->dim, s->qkv, qkv_width, l->k_cache, l->v_cache,
                           s->slots, s->gather, s->attend_len, s->lens, l->window, s->scale, s->attn, s->scratch),
              5);
        CHECK(project(k, s, &l->o, s->attn, s->o_out), 1);
        CHECK(k->norm(s->rows, s->hidden, s->x, s->hidden, s->o_out, s->hidden, l->post_norm, s->eps, s->normed,
                      s->hidden), 2);
        CHECK(project(k, s, &l->gate_up, s->normed, s->gate_up), 1);
        CHECK(k->silu(s->rows, s->intermediate, s->gate_up, 2 * s->intermediate, s->act, s->intermediate), 4);
        CHECK(project(k, s, &l->down, s->act, s->down_out), 1);
    }
    return 0;
}
