"""Batched multi-LoRA on CUDA in two Triton kernels per fused projection (Punica's SGMV, grouped).

A fused projection (q/k/v, gate/up, or a single one) keeps its adapters' factors in two device
buffers (server/adapters/lora.py, `PackedGroup`): A as [cols, parts, in] (the parts share their
input) and B^T as [cols, sum(out)] (the parts side by side, as in the projection's output). The
step's tokens are sorted by adapter into tiles of up to TILE tokens of one adapter (`plan_tiles`),
and for all the parts at once:

  shrink:  partial[t, p, :] += x[t, split s] @ A[lo : lo + width, p, split s]^T   (fp32, atomic)
  expand:  y[t, n] += partial[t, part(n), :] @ B^T[lo : lo + width, n]

each tile one matrix product on the tensor cores, so an adapter's columns are read once per tile,
not once per token (a per-token version measured 6.2 ms of LoRA per 64-row step of an 8B model,
where the base step took 11). The token order and the tiles are device tensors, so a CUDA graph
captures the two launches once and replays them for any mix (unused tile slots have width 0).
The input is split along `in` (s) so a few tiles still spread over the GPU; the splits add into
the zeroed partial sums atomically (a version that kept them apart and summed them in the expand
spent 17 us per shrink at 64 rows, with too few splits, or per expand, with many).

`TRITON_INTERPRET=1` runs the same kernels on CPU tensors (the tests do, in fp32).
"""

from __future__ import annotations

import functools
import logging
import time
from typing import Optional, Sequence

import torch

log = logging.getLogger(__name__)

SHRINK_BLOCK = 128  # input features per shrink iteration
EXPAND_BLOCK = 128  # output features per expand program
TILE = 16  # tokens of one adapter per tile (the smallest matrix product the tensor cores take)
MIN_RANK_BLOCK = 16  # the rank tile: the step's widest adapter, rounded up to a power of two, at least this
MAX_PARTS = 3  # q/k/v
TARGET_PROGRAMS = 2048  # shrink programs to aim for (an H100 has 132 SMs; most tile slots are empty)


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


def splits_for(tiles: int, parts: int, in_features: int) -> int:
    """How many pieces the shrink cuts `in` into: enough programs to fill the GPU (counting every
    tile slot, used or not: a graph fixes the count), at least one block of input each."""
    most = max(1, -(-in_features // SHRINK_BLOCK))
    return max(1, min(most, -(-TARGET_PROGRAMS // (tiles * parts))))


def plan_tiles(lo: Sequence[int], width: Sequence[int], max_tiles: int) -> tuple[list[int], list[list[int]]]:
    """Token rows sorted by adapter (rows without one left out) and the [4, max_tiles] tiles
    (start in that order, count, first column, width) of up to TILE rows of one adapter each;
    unused slots have width 0. max_tiles >= the number of rows always suffices."""
    order = sorted((t for t in range(len(lo)) if width[t] > 0), key=lambda t: (lo[t], width[t]))
    tiles: list[list[int]] = [[0] * max_tiles for _ in range(4)]
    g = start = 0
    while start < len(order):
        adapter = (lo[order[start]], width[order[start]])
        end = start + 1
        while end < len(order) and end - start < TILE and (lo[order[end]], width[order[end]]) == adapter:
            end += 1
        for field, value in enumerate((start, end - start, *adapter)):
            tiles[field][g] = value
        g, start = g + 1, end
    return order + [0] * (len(lo) - len(order)), tiles


def add_lora(y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b_t: torch.Tensor, part_sizes: tuple[int, ...],
             order: torch.Tensor, tiles: torch.Tensor, rank_tile: int,
             partial: Optional[torch.Tensor] = None) -> None:
    """y [tokens, sum(part_sizes)] += each token's LoRA delta over every part.

    x: [tokens, in] (rows may be strided); a: [cols, parts, in] and b_t: [cols, sum(part_sizes)],
    contiguous; order [tokens] and tiles [4, tile slots] (rows may be strided), int32 on the device
    (plan_tiles; a launch covers every slot, so a decode graph keeps only as many as its mixes need);
    rank_tile >= every width (a power of two); partial: zeroed fp32 [tokens, parts, rank_tile] for
    the shrink's sums (None: allocated here)."""
    shrink, expand = triton_kernels()
    tokens, in_features = x.shape
    parts, out_features = a.shape[1], b_t.shape[1]
    if tokens == 0:
        return
    if x.stride(1) != 1 or y.stride(1) != 1 or not a.is_contiguous() or not b_t.is_contiguous() or tiles.stride(1) != 1:
        raise ValueError("add_lora: x and y need unit column strides, a and b_t contiguous")
    if parts > MAX_PARTS or len(part_sizes) != parts or sum(part_sizes) != out_features or y.shape[1] != out_features:
        raise ValueError(f"add_lora: parts {part_sizes} do not match a {tuple(a.shape)}, b_t {tuple(b_t.shape)}")
    max_tiles = tiles.shape[1]
    splits = splits_for(max_tiles, parts, in_features)
    per_split = -(-in_features // (splits * SHRINK_BLOCK)) * SHRINK_BLOCK
    splits = -(-in_features // per_split)  # (rounding per_split up may leave fewer pieces)
    precision = "ieee" if x.dtype == torch.float32 else "tf32"  # (fp32 stays fp32; bf16 products are exact)
    if partial is None:  # the splits add up here
        partial = torch.zeros(tokens, parts, rank_tile, device=x.device, dtype=torch.float32)
    shrink[(max_tiles, parts, splits)](x, x.stride(0), a, order, tiles, partial, tiles.stride(0), in_features,
                                       per_split, PARTS=parts, RANK=rank_tile, TILE=TILE, BLOCK=SHRINK_BLOCK,
                                       PRECISION=precision)
    ends = [sum(part_sizes[: i + 1]) for i in range(parts)] + [out_features] * (MAX_PARTS - parts)
    expand[(max_tiles, -(-out_features // EXPAND_BLOCK))](
        y, y.stride(0), b_t, order, tiles, partial, tiles.stride(0), out_features, ends[0], ends[1],
        PARTS=parts, RANK=rank_tile, TILE=TILE, BLOCK=EXPAND_BLOCK, PRECISION=precision)


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
        order = torch.zeros(2, dtype=torch.int32, device=device)
        tiles = torch.zeros(4, 2, dtype=torch.int32, device=device)
        for tile in WARM_RANK_TILES:
            add_lora(y, x, a, b_t, sizes, order, tiles, tile)
    return time.monotonic() - started
