"""The Triton kernels of server/kernels/lora_triton.py (imported only where Triton is): see there.

A tile is up to TILE tokens of one adapter, taken from `order` (token rows sorted by adapter) at
[start, start + count), using packed columns [lo, lo + width); width 0: an unused tile slot.
"""

import triton
import triton.language as tl


@triton.jit
def _tile(tiles_ptr, g, tiles_stride):
    """(start, count, lo, width) of tile g (tiles: [4, tile slots] int32, rows tiles_stride apart)."""
    start = tl.load(tiles_ptr + g)
    count = tl.load(tiles_ptr + tiles_stride + g)
    lo = tl.load(tiles_ptr + 2 * tiles_stride + g).to(tl.int64)
    width = tl.load(tiles_ptr + 3 * tiles_stride + g)
    return start, count, lo, width


# Sizes that change from step to step are not specialised on (a new value would compile again).
@triton.jit(do_not_specialize=["tiles_stride", "per_split"])
def shrink(x_ptr, x_stride, a_ptr, order_ptr, tiles_ptr, out_ptr, tiles_stride, in_features, per_split,
           PARTS: tl.constexpr, RANK: tl.constexpr, TILE: tl.constexpr, BLOCK: tl.constexpr,
           PRECISION: tl.constexpr):
    """out[row, p, :] += x[row, split s] @ A[lo : lo + width, p, split s]^T for the tile's rows (the
    splits add up in `out`, zeroed before)."""
    g, p, s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    start, count, lo, width = _tile(tiles_ptr, g, tiles_stride)
    if width > 0:
        m = tl.arange(0, TILE)
        rows = tl.load(order_ptr + start + m, mask=m < count, other=0).to(tl.int64)
        r = tl.arange(0, RANK)
        a_rows = a_ptr + ((lo + r[:, None]) * PARTS + p) * in_features  # [RANK, 1]
        acc = tl.zeros([TILE, RANK], dtype=tl.float32)
        first = s * per_split
        for offset in range(0, per_split, BLOCK):
            k = first + offset + tl.arange(0, BLOCK)
            kmask = k < in_features
            xv = tl.load(x_ptr + rows[:, None] * x_stride + k[None, :], mask=(m < count)[:, None] & kmask[None, :],
                         other=0.0)
            av = tl.load(a_rows + k[None, :], mask=(r < width)[:, None] & kmask[None, :], other=0.0)
            acc += tl.dot(xv, tl.trans(av), input_precision=PRECISION)
        tl.atomic_add(out_ptr + (rows[:, None] * PARTS + p) * RANK + r[None, :], acc, mask=(m < count)[:, None])


@triton.jit
def _part_rows(part_ptr, rows, row_mask, p, width, PARTS: tl.constexpr, RANK: tl.constexpr):
    """x[rows] @ A_p^T: [TILE, RANK] fp32."""
    r = tl.arange(0, RANK)
    return tl.load(part_ptr + (rows[:, None] * PARTS + p) * RANK + r[None, :],
                   mask=row_mask[:, None] & (r < width)[None, :], other=0.0)


@triton.jit(do_not_specialize=["tiles_stride", "first_end", "second_end"])
def expand(y_ptr, y_stride, b_ptr, order_ptr, tiles_ptr, part_ptr, tiles_stride, out_features, first_end,
           second_end, PARTS: tl.constexpr, RANK: tl.constexpr, TILE: tl.constexpr, BLOCK: tl.constexpr,
           PRECISION: tl.constexpr):
    """y[row, n] += (x[row] @ A_part(n)^T) @ B^T[lo : lo + width, n] for the tile's rows."""
    g, block = tl.program_id(0), tl.program_id(1)
    start, count, lo, width = _tile(tiles_ptr, g, tiles_stride)
    if width > 0:
        m = tl.arange(0, TILE)
        row_mask = m < count
        rows = tl.load(order_ptr + start + m, mask=row_mask, other=0).to(tl.int64)
        n = block * BLOCK + tl.arange(0, BLOCK)
        nmask = n < out_features
        r = tl.arange(0, RANK)
        bv = tl.load(b_ptr + (lo + r[:, None]) * out_features + n[None, :], mask=(r < width)[:, None] & nmask[None, :],
                     other=0.0)
        zero = tl.zeros_like(bv)
        xa = _part_rows(part_ptr, rows, row_mask, 0, width, PARTS, RANK).to(bv.dtype)
        delta = tl.dot(xa, tl.where((n < first_end)[None, :], bv, zero), input_precision=PRECISION)
        if PARTS > 1:
            xa = _part_rows(part_ptr, rows, row_mask, 1, width, PARTS, RANK).to(bv.dtype)
            inside = (n >= first_end) & (n < second_end)
            delta += tl.dot(xa, tl.where(inside[None, :], bv, zero), input_precision=PRECISION)
        if PARTS > 2:
            xa = _part_rows(part_ptr, rows, row_mask, 2, width, PARTS, RANK).to(bv.dtype)
            delta += tl.dot(xa, tl.where((n >= second_end)[None, :], bv, zero), input_precision=PRECISION)
        mask = row_mask[:, None] & nmask[None, :]
        targets = y_ptr + rows[:, None] * y_stride + n[None, :]
        y = tl.load(targets, mask=mask, other=0.0)
        tl.store(targets, (y.to(tl.float32) + delta).to(y.dtype), mask=mask)
