"""Batched multi-LoRA on CUDA in two Triton kernels per fused projection (Punica's BGMV, grouped).

A fused projection (q/k/v, gate/up, or a single one) keeps its adapters' factors in two device
buffers (server/adapters/lora.py, `PackedGroup`): A as [cols, parts, in] (the parts share their
input) and B^T as [cols, sum(out)] (the parts side by side, as in the projection's output). Token
t uses the columns [lo[t], lo[t] + rank[t]) (rank 0: the base model). For all the parts at once:

  shrink:  partial[s, t, p, :] = x[t, split s] @ A[lo[t] : lo[t] + rank[t], p, split s]^T   (fp32)
  expand:  y[t, n] += sum over s, r of partial[s, t, part(n), r] * B^T[lo[t] + r, n]

`lo` and `rank` are device tensors, so a CUDA graph captures the two launches once and replays
them for any mix of adapters. Each token reads only its own adapter's columns; the input is split
along `in` (s) so a few tokens still spread over the GPU, and the expand sums the splits.

`TRITON_INTERPRET=1` runs the same kernels on CPU tensors (the tests do, in fp32).
"""

from __future__ import annotations

import functools
import logging
import time
from typing import Optional

import torch

log = logging.getLogger(__name__)

SHRINK_BLOCK = 128  # input features per shrink iteration
EXPAND_BLOCK = 128  # output features per expand program
MIN_RANK_BLOCK = 16  # the rank tile: the step's widest adapter, rounded up to a power of two, at least this
MAX_PARTS = 3  # q/k/v
TARGET_PROGRAMS = 512  # shrink programs to aim for (an H100 has 132 SMs): splits of `in` make up the rest


@functools.cache
def triton_kernels() -> Optional[tuple]:
    """(shrink, expand) jitted kernels, or None where Triton is missing or broken (callers keep
    their torch path)."""
    try:
        from server.kernels.lora_triton_jit import expand, shrink
    except Exception as exc:  # noqa: BLE001 (any import failure: no Triton here)
        log.info("Triton unavailable (%s): LoRA on CUDA uses torch matmuls", exc)
        return None
    return shrink, expand


def rank_block(widest: int) -> int:
    """The kernels' rank tile for a step whose widest adapter has this many columns."""
    return max(MIN_RANK_BLOCK, 1 << (max(widest, 1) - 1).bit_length())


def splits_for(tokens: int, parts: int, in_features: int) -> int:
    """How many pieces the shrink cuts `in` into: enough programs to fill the GPU, at least one
    block of input each."""
    most = max(1, -(-in_features // SHRINK_BLOCK))
    return max(1, min(most, -(-TARGET_PROGRAMS // (tokens * parts))))


def add_lora(y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b_t: torch.Tensor, part_sizes: tuple[int, ...],
             lo: torch.Tensor, rank: torch.Tensor, rank_tile: int) -> None:
    """y [tokens, sum(part_sizes)] += each token's LoRA delta over every part.

    x: [tokens, in] (rows may be strided); a: [cols, parts, in] and b_t: [cols, sum(part_sizes)],
    contiguous; lo, rank: [tokens] int32 on the device; rank_tile >= every rank (a power of two)."""
    shrink, expand = triton_kernels()
    tokens, in_features = x.shape
    parts, out_features = a.shape[1], b_t.shape[1]
    if tokens == 0:
        return
    if x.stride(1) != 1 or y.stride(1) != 1 or not a.is_contiguous() or not b_t.is_contiguous():
        raise ValueError("add_lora: x and y need unit column strides, a and b_t contiguous")
    if parts > MAX_PARTS or len(part_sizes) != parts or sum(part_sizes) != out_features or y.shape[1] != out_features:
        raise ValueError(f"add_lora: parts {part_sizes} do not match a {tuple(a.shape)}, b_t {tuple(b_t.shape)}")
    splits = splits_for(tokens, parts, in_features)
    per_split = -(-in_features // (splits * SHRINK_BLOCK)) * SHRINK_BLOCK
    splits = -(-in_features // per_split)  # (rounding per_split up may leave fewer pieces)
    partial = torch.empty(splits, tokens, parts, rank_tile, device=x.device, dtype=torch.float32)
    shrink[(tokens, parts, splits)](x, x.stride(0), a, lo, rank, partial, tokens, in_features, per_split,
                                    PARTS=parts, RANK=rank_tile, BLOCK=SHRINK_BLOCK)
    ends = [sum(part_sizes[: i + 1]) for i in range(parts)] + [out_features] * (MAX_PARTS - parts)
    expand[(tokens, -(-out_features // EXPAND_BLOCK))](
        y, y.stride(0), b_t, lo, rank, partial, tokens, out_features, ends[0], ends[1], splits,
        PARTS=parts, RANK=rank_tile, BLOCK=EXPAND_BLOCK)


WARM_RANK_TILES = (16, 32, 64)  # compiled at start; a wider adapter's tile compiles at its first use


def warm_up(shapes: set[tuple[int, int, tuple[int, ...]]], device: torch.device, dtype: torch.dtype) -> float:
    """Compile the kernels for each (parts, in, part sizes) of a model and the usual rank tiles, on
    rows of no adapter (nothing is computed): a compile inside serving stalled every stream for
    ~1 s, and inside a CUDA graph's capture. Triton keeps compiled kernels on disk, so a restart
    is quick. Returns the seconds taken."""
    started = time.monotonic()
    for parts, in_features, sizes in sorted(shapes):
        x = torch.zeros(2, in_features, device=device, dtype=dtype)
        y = torch.zeros(2, sum(sizes), device=device, dtype=dtype)
        a = torch.zeros(8, parts, in_features, device=device, dtype=dtype)
        b_t = torch.zeros(8, sum(sizes), device=device, dtype=dtype)
        lo = width = torch.zeros(2, dtype=torch.int32, device=device)
        for tile in WARM_RANK_TILES:
            add_lora(y, x, a, b_t, sizes, lo, width, tile)
    return time.monotonic() - started
