"""The Triton kernels of server/kernels/fused_triton.py (imported only where Triton is): see there.

Each rounds where torch's ops round (the model dtype after every op the fused ones replace), so
results match the unfused path up to the exp/rsqrt implementations.
"""

import triton
import triton.language as tl


@triton.jit
def add_rms_norm(x_ptr, x_stride, d_ptr, d_stride, w_ptr, out_ptr, out_stride, dim, eps,
                 HAS_DELTA: tl.constexpr, BLOCK: tl.constexpr):
    """Row r: x[r] += d[r] (rounded, stored), out[r] = x[r] * rsqrt(mean(x[r]^2) + eps) * w."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < dim
    x = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0)
    if HAS_DELTA:
        d = tl.load(d_ptr + row * d_stride + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + d.to(tl.float32)).to(x.dtype)
        tl.store(x_ptr + row * x_stride + cols, x, mask=mask)
    xf = x.to(tl.float32)
    inv = tl.rsqrt(tl.sum(xf * xf, axis=0) / dim + eps)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * out_stride + cols, (xf * inv * w).to(x.dtype), mask=mask)


@triton.jit
def silu_mul(gu_ptr, gu_stride, out_ptr, out_stride, dim, BLOCK: tl.constexpr):
    """out[r, c] = silu(gate[r, c]) * up[r, c], gate_up[r] = [gate, up]; silu rounded first, as F.silu."""
    row, block = tl.program_id(0).to(tl.int64), tl.program_id(1)
    cols = block * BLOCK + tl.arange(0, BLOCK)
    mask = cols < dim
    gate = tl.load(gu_ptr + row * gu_stride + cols, mask=mask, other=0.0)
    up = tl.load(gu_ptr + row * gu_stride + dim + cols, mask=mask, other=0.0)
    g = gate.to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(gate.dtype).to(tl.float32)
    tl.store(out_ptr + row * out_stride + cols, (act * up.to(tl.float32)).to(gate.dtype), mask=mask)


@triton.jit
def _round(x, like):
    return x.to(like.dtype).to(tl.float32)


@triton.jit
def _head_norm(x1, x2, w_ptr, half, dim, eps, hmask, like, HALF: tl.constexpr):
    """A head's two halves normed over the whole head (Qwen3's q/k norms), rounded as F.rms_norm."""
    inv = tl.rsqrt((tl.sum(x1 * x1, axis=0) + tl.sum(x2 * x2, axis=0)) / dim + eps)
    h = tl.arange(0, HALF)
    w1 = tl.load(w_ptr + h, mask=hmask, other=0.0).to(tl.float32)
    w2 = tl.load(w_ptr + half + h, mask=hmask, other=0.0).to(tl.float32)
    return _round(x1 * inv * w1, like), _round(x2 * inv * w2, like)


@triton.jit
def rope_store(qkv_ptr, qkv_stride, cos_ptr, sin_ptr, k_ptr, v_ptr, row_ptr, row_stride, pos_ptr, pos_stride,
               head_stride, heads, kv_heads, half, eps, qn_ptr, kn_ptr,
               NORMED: tl.constexpr, HALF: tl.constexpr):
    """Program (t, h) over token t's head h of the fused q/k/v row: q heads and k heads (normed
    first where NORMED) rotated in place, rotate-half style with each product and the sum rounded
    as torch's ops round; k and v heads also written to the cache at row[t] * row_stride +
    pos[t] * pos_stride + head * head_stride (dense: slot and position; paged: the flat slot, pos_stride 0)."""
    t, h = tl.program_id(0).to(tl.int64), tl.program_id(1)
    dim = 2 * half
    i = tl.arange(0, HALF)
    hmask = i < half
    src = qkv_ptr + t * qkv_stride + h * dim
    a = tl.load(src + i, mask=hmask, other=0.0)
    b = tl.load(src + half + i, mask=hmask, other=0.0)
    target = tl.load(row_ptr + t).to(tl.int64) * row_stride + tl.load(pos_ptr + t).to(tl.int64) * pos_stride
    if h >= heads + kv_heads:  # a v head: stored as it is
        tl.store(v_ptr + target + (h - heads - kv_heads) * head_stride + i, a, mask=hmask)
        tl.store(v_ptr + target + (h - heads - kv_heads) * head_stride + half + i, b, mask=hmask)
    else:
        x1, x2 = a.to(tl.float32), b.to(tl.float32)
        if NORMED:
            x1, x2 = _head_norm(x1, x2, qn_ptr if h < heads else kn_ptr, half, dim, eps, hmask, a, HALF)
        c1 = tl.load(cos_ptr + t * dim + i, mask=hmask, other=0.0).to(tl.float32)
        c2 = tl.load(cos_ptr + t * dim + half + i, mask=hmask, other=0.0).to(tl.float32)
        s1 = tl.load(sin_ptr + t * dim + i, mask=hmask, other=0.0).to(tl.float32)
        s2 = tl.load(sin_ptr + t * dim + half + i, mask=hmask, other=0.0).to(tl.float32)
        r1 = (_round(x1 * c1, a) + _round(-x2 * s1, a)).to(a.dtype)
        r2 = (_round(x2 * c2, a) + _round(x1 * s2, a)).to(a.dtype)
        tl.store(src + i, r1, mask=hmask)
        tl.store(src + half + i, r2, mask=hmask)
        if h >= heads:
            tl.store(k_ptr + target + (h - heads) * head_stride + i, r1, mask=hmask)
            tl.store(k_ptr + target + (h - heads) * head_stride + half + i, r2, mask=hmask)


@triton.jit
def decode_attention(q_ptr, q_stride, k_ptr, v_ptr, slot_ptr, lens_ptr, out_ptr, out_stride, part_ptr, stat_ptr,
                     row_stride, head_stride, pos_stride, heads, dim, scale, window,
                     GROUP: tl.constexpr, G_PAD: tl.constexpr, D_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
                     SPLITS: tl.constexpr, PRECISION: tl.constexpr):
    """Program (r, kv head h, split s): the GROUP query heads sharing KV head h of decode row r
    attend over split s of the row's own positions [max(0, len - window), len) (window 0: all),
    with an online softmax in fp32. One split: the output, normalised. Several: each split's
    unnormalised sums [G, D] and its (max, sum of exponentials) for combine_splits."""
    r, h, s = tl.program_id(0).to(tl.int64), tl.program_id(1), tl.program_id(2)
    length = tl.load(lens_ptr + r).to(tl.int32)
    first = tl.where(window > 0, tl.maximum(length - window, 0), 0)
    chunk = tl.cdiv(length - first, SPLITS)
    lo = first + s * chunk
    hi = tl.minimum(lo + chunk, length)
    g, d = tl.arange(0, G_PAD), tl.arange(0, D_PAD)
    qmask = (g < GROUP)[:, None] & (d < dim)[None, :]
    q = tl.load(q_ptr + r * q_stride + (h * GROUP + g)[:, None] * dim + d[None, :], mask=qmask, other=0.0)
    base = tl.load(slot_ptr + r).to(tl.int64) * row_stride + h * head_stride
    m_i = tl.full([G_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, D_PAD], tl.float32)
    for start in range(lo, hi, BLOCK_N):
        n = start + tl.arange(0, BLOCK_N)
        kvmask = (n < hi)[:, None] & (d < dim)[None, :]
        k = tl.load(k_ptr + base + n[:, None].to(tl.int64) * pos_stride + d[None, :], mask=kvmask, other=0.0)
        scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # [G_PAD, BLOCK_N]
        scores = tl.where((n < hi)[None, :], scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        p = tl.exp(scores - m_new[:, None])
        alpha = tl.exp(m_i - m_new)
        v = tl.load(v_ptr + base + n[:, None].to(tl.int64) * pos_stride + d[None, :], mask=kvmask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        m_i = m_new
    head = h * GROUP + g
    if SPLITS == 1:
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(out_ptr + r * out_stride + head[:, None] * dim + d[None, :], out.to(q.dtype), mask=qmask)
    else:
        cell = (r * heads + head) * SPLITS + s  # [G_PAD] rows of part [rows, heads, SPLITS, dim]
        tl.store(part_ptr + cell[:, None] * dim + d[None, :], acc, mask=qmask)
        tl.store(stat_ptr + 2 * cell, m_i, mask=g < GROUP)
        tl.store(stat_ptr + 2 * cell + 1, l_i, mask=g < GROUP)


@triton.jit
def combine_splits(part_ptr, stat_ptr, out_ptr, out_stride, heads, dim,
                   SPLITS: tl.constexpr, D_PAD: tl.constexpr):
    """Program (r, head): the splits' sums rescaled to their common maximum and normalised."""
    r, head = tl.program_id(0).to(tl.int64), tl.program_id(1)
    s, d = tl.arange(0, SPLITS), tl.arange(0, D_PAD)
    cell = (r * heads + head) * SPLITS + s
    m = tl.load(stat_ptr + 2 * cell)
    l_s = tl.load(stat_ptr + 2 * cell + 1)
    top = tl.max(m, axis=0)
    w = tl.where(m > float("-inf"), tl.exp(m - top), 0.0)  # (an empty split weighs nothing)
    acc = tl.load(part_ptr + cell[:, None] * dim + d[None, :], mask=(d < dim)[None, :], other=0.0)
    out = tl.sum(acc * w[:, None], axis=0) / tl.sum(l_s * w, axis=0)
    tl.store(out_ptr + r * out_stride + head * dim + d, out.to(out_ptr.dtype.element_ty), mask=d < dim)
