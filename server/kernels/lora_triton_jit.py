"""The Triton kernels of server/kernels/lora_triton.py (imported only where Triton is): see there."""

import triton
import triton.language as tl


# Sizes that change from step to step are not specialised on (a new value would compile again).
@triton.jit(do_not_specialize=["tokens", "per_split"])
def shrink(x_ptr, x_stride, a_ptr, lo_ptr, rank_ptr, out_ptr, tokens, in_features, per_split,
           PARTS: tl.constexpr, RANK: tl.constexpr, BLOCK: tl.constexpr):
    t, p, s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rank = tl.load(rank_ptr + t)
    if rank > 0:
        lo = tl.load(lo_ptr + t).to(tl.int64)
        r = tl.arange(0, RANK)
        rows = a_ptr + ((lo + r[:, None]) * PARTS + p) * in_features  # [RANK, 1] row starts
        acc = tl.zeros([RANK], dtype=tl.float32)
        start = s * per_split
        for offset in range(0, per_split, BLOCK):
            k = start + offset + tl.arange(0, BLOCK)
            kmask = k < in_features
            xv = tl.load(x_ptr + t * x_stride + k, mask=kmask, other=0.0).to(tl.float32)
            av = tl.load(rows + k[None, :], mask=(r[:, None] < rank) & kmask[None, :], other=0.0)
            acc += tl.sum(av.to(tl.float32) * xv[None, :], axis=1)
        tl.store(out_ptr + ((s * tokens + t) * PARTS + p) * RANK + r, acc)

@triton.jit
def part_row(part_ptr, tokens, t, p, rank, splits, PARTS: tl.constexpr, RANK: tl.constexpr):
    """x[t] @ A_p^T of token t, the splits summed: [RANK] fp32."""
    r = tl.arange(0, RANK)
    row = tl.zeros([RANK], dtype=tl.float32)
    for s in range(splits):
        row += tl.load(part_ptr + ((s * tokens + t) * PARTS + p) * RANK + r, mask=r < rank, other=0.0)
    return row

@triton.jit(do_not_specialize=["tokens", "first_end", "second_end", "splits"])
def expand(y_ptr, y_stride, b_ptr, lo_ptr, rank_ptr, part_ptr, tokens, out_features, first_end, second_end, splits,
           PARTS: tl.constexpr, RANK: tl.constexpr, BLOCK: tl.constexpr):
    t, block = tl.program_id(0), tl.program_id(1)
    rank = tl.load(rank_ptr + t)
    if rank > 0:
        lo = tl.load(lo_ptr + t).to(tl.int64)
        n = block * BLOCK + tl.arange(0, BLOCK)
        nmask = n < out_features
        r = tl.arange(0, RANK)
        # each part's [RANK] row once; column n takes its own part's (registers, no gather)
        xa = tl.zeros([RANK, BLOCK], dtype=tl.float32) + part_row(part_ptr, tokens, t, 0, rank, splits, PARTS,
                                                                  RANK)[:, None]
        if PARTS > 1:
            second = part_row(part_ptr, tokens, t, 1, rank, splits, PARTS, RANK)
            xa = tl.where((n >= first_end)[None, :], second[:, None], xa)
        if PARTS > 2:
            third = part_row(part_ptr, tokens, t, 2, rank, splits, PARTS, RANK)
            xa = tl.where((n >= second_end)[None, :], third[:, None], xa)
        bv = tl.load(b_ptr + (lo + r[:, None]) * out_features + n[None, :],
                     mask=(r[:, None] < rank) & nmask[None, :], other=0.0)
        delta = tl.sum(xa * bv.to(tl.float32), axis=0)
        y = tl.load(y_ptr + t * y_stride + n, mask=nmask, other=0.0)
        tl.store(y_ptr + t * y_stride + n, (y.to(tl.float32) + delta).to(y.dtype), mask=nmask)
