"""Batched multi-LoRA: y = W x + B_a (A_a x) for every token's own adapter a, in one pass.

The device tier packs every resident adapter's A and B (scale folded into B) side by side along
the rank axis of each target projection, in slots of SLOT_COLUMNS columns. Each step gets a
LoraBatch built once by a planner: one adapter for every token (two plain matmuls), a masked
column window (two matmuls however many adapters, cost growing with the window's width), tokens
sorted by adapter into one grouped matmul each way over the window's slots, sorted runs of tokens
with a pair of matmuls per adapter, each token's columns gathered (BGMV), or each token's own
columns read in place by a C kernel (server/kernels, CPU), or by two Triton kernels per fused
projection (CUDA: every part at once, the rows' columns in device tensors that the decode graphs
replay). On CPU the cheapest is picked per step from a cost model per dtype measured by
bench/lora_op.py; on CUDA the Triton kernels (the masked window where Triton is missing).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from server.adapters.weights import AdapterKey, AdapterWeights
from server.kernels import lora_triton, native
from server.kernels.lora_triton import add_lora, plan_tiles, rank_block, triton_kernels
from server.kernels.native import BlockedInt8, BlockedWeight, LoraKernel, LoraPool, LoraStep, foldable, lora_kernel
from server.model.decoder import CausalLM
from server.model.layers import LoraTarget

log = logging.getLogger(__name__)

SLOT_COLUMNS = native.FOLD_SLOT  # packed columns are allocated in slots this wide: a rank-8 adapter is one slot
KERNEL_ANY_STEP_THREADS = 4  # up to this many torch threads the C kernel takes every CPU step ...
KERNEL_SMALL_STEP_TOKENS = 64  # ... beyond, the steps of at most this many tokens
SLOT_ROWS_MAX_TOKENS = 512  # CUDA: steps up to this many tokens use the Triton kernels (they read per token)
SPREAD_SLACK = 2  # adapters' widths a step's adapters may spread beyond their own before they are packed
Range = tuple[int, int]  # an adapter's packed columns [lo, hi)
Blocked = BlockedWeight | BlockedInt8  # linear_cpu.c's weights
OptionalTensor = Optional[torch.Tensor]
Ranges = tuple[Optional[Range], ...]  # per sequence; None: the base model


@dataclass(frozen=True)
class LoraBatch:
    """A step's LoRA: the packed columns each sequence uses (None: the base model) and how the
    delta is computed (one subclass per method)."""

    ranges: Ranges
    query_lens: tuple[int, ...]  # tokens per sequence

    def add(self, y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b_t: torch.Tensor) -> None:
        """y [tokens, out] += each token's delta; x: [tokens, in]; a: [cols, in]; b_t: [cols, out]."""
        raise NotImplementedError

    def add_parts(self, y: torch.Tensor, x: torch.Tensor, parts: Sequence[Optional["PackedLora"]],
                  sizes: Sequence[int]) -> None:
        """y [tokens, sum(sizes)] += the delta of each part of a fused projection (None: no LoRA there)."""
        start = 0
        for lora, size in zip(parts, sizes):
            if lora is not None:
                self.add(y[:, start : start + size], x, lora.a, lora.b_t)
            start += size

    def project(self, x: torch.Tensor, weight: Blocked, parts: Sequence[Optional["PackedLora"]]) -> OptionalTensor:
        """x's projection through a blocked CPU weight (bf16, or an int8 copy) with every part's delta
        added in the same pass, or None where this plan can't (the caller then projects and calls
        add_parts)."""
        return None

    def begin_pass(self) -> None:
        """Called by the model at the start of each forward pass with this plan."""

    def token_columns(self) -> tuple[list[int], list[int]]:
        """Each token's first packed column and width (0: the base model)."""
        lo, width = [], []
        for r, n in zip(self.ranges, self.query_lens):
            lo.extend([0 if r is None else r[0]] * n)
            width.extend([0 if r is None else r[1] - r[0]] * n)
        return lo, width

    def dense_mask(self, columns: int, dtype: torch.dtype) -> torch.Tensor:
        """[tokens, columns] 0/1: each token's own columns (the CUDA graphs' masked window)."""
        mask = torch.zeros(sum(self.query_lens), columns, dtype=dtype)
        start = 0
        for r, n in zip(self.ranges, self.query_lens):
            if r is not None:
                mask[start : start + n, r[0] : r[1]] = 1
            start += n
        return mask


@dataclass(frozen=True)
class OneAdapter(LoraBatch):
    """Every token uses the columns [lo, hi): no mask."""

    lo: int = 0
    hi: int = 0

    def add(self, y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b_t: torch.Tensor) -> None:
        y += F.linear(x, a[self.lo : self.hi]) @ b_t[self.lo : self.hi]


@dataclass(frozen=True)
class MaskedWindow(LoraBatch):
    """The column window [lo, hi) covering the step's adapters; a 0/1 mask keeps each token on its
    own adapter's columns. Costs tokens x window width, adapters between them included."""

    lo: int = 0
    hi: int = 0
    mask: Optional[torch.Tensor] = None  # [tokens, hi - lo] in the model dtype

    def add(self, y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b_t: torch.Tensor) -> None:
        xa = F.linear(x, a[self.lo : self.hi])  # [tokens, window]
        y += (xa * self.mask) @ b_t[self.lo : self.hi]


@dataclass(frozen=True)
class SortedGroups(LoraBatch):
    """The adapter tokens sorted by slot, one grouped matmul each way over the slots [first_slot,
    first_slot + slots) viewed as a stack of [in, SLOT_COLUMNS] matrices (no copy of the weights),
    added back to their rows. Costs the rank per token, plus a little per slot in the window
    (empty ones too). Every adapter in the step is one slot wide."""

    order: Optional[torch.Tensor] = None  # [adapter tokens] long: token rows sorted by slot
    offsets: Optional[torch.Tensor] = None  # [slots] int32: cumulative tokens up to each slot
    first_slot: int = 0
    slots: int = 0

    def add(self, y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b_t: torch.Tensor) -> None:
        lo, hi = self.first_slot * SLOT_COLUMNS, (self.first_slot + self.slots) * SLOT_COLUMNS
        a3 = a[lo:hi].view(self.slots, SLOT_COLUMNS, -1).transpose(1, 2)  # [slots, in, r]
        b3 = b_t[lo:hi].view(self.slots, SLOT_COLUMNS, -1)  # [slots, r, out]
        xa = torch._grouped_mm(x.index_select(0, self.order), a3, offs=self.offsets)  # [adapter tokens, r]
        y.index_add_(0, self.order, torch._grouped_mm(xa, b3, offs=self.offsets))


@dataclass(frozen=True)
class SortedRuns(LoraBatch):
    """The adapter tokens sorted by adapter, a pair of matmuls per adapter (any ranks)."""

    order: Optional[torch.Tensor] = None  # [adapter tokens] long: token rows sorted by adapter
    runs: tuple[tuple[int, int, int, int], ...] = ()  # (start, end) in `order`, the adapter's (lo, hi)

    def add(self, y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b_t: torch.Tensor) -> None:
        xs = x.index_select(0, self.order)
        delta = torch.cat([F.linear(xs[s:e], a[lo:hi]) @ b_t[lo:hi] for s, e, lo, hi in self.runs])
        y.index_add_(0, self.order, delta)


@dataclass(frozen=True)
class GatheredRows(LoraBatch):
    """Each adapter token's own A and B^T columns gathered, two batched products (BGMV): the cost
    of one adapter's rank per token whatever the batch mixes, plus copying those columns (so
    meant for few tokens). Every adapter in the step is as wide."""

    rows: Optional[torch.Tensor] = None  # [adapter tokens] long
    columns: Optional[torch.Tensor] = None  # [adapter tokens * width] long: each token's packed columns
    width: int = 0

    def add(self, y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b_t: torch.Tensor) -> None:
        n = self.rows.shape[0]
        a_rows = a.index_select(0, self.columns).view(n, self.width, -1)  # [n, width, in]
        b_rows = b_t.index_select(0, self.columns).view(n, self.width, -1)  # [n, width, out]
        xa = torch.bmm(x.index_select(0, self.rows).unsqueeze(1), a_rows.transpose(1, 2))  # [n, 1, width]
        y.index_add_(0, self.rows, torch.bmm(xa, b_rows).squeeze(1))


@dataclass(frozen=True)
class TokenColumns(LoraBatch):
    """Each token's own columns [lo, lo + width), read in place by a C kernel (server/kernels): the
    cost of its own rank per token, whatever the step mixes, and no copies (CPU)."""

    step: Optional[LoraStep] = None  # each token's columns and the tokens by adapter, checked once

    def add(self, y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b_t: torch.Tensor) -> None:
        self.step(y, x, a, b_t)

    def project(self, x: torch.Tensor, weight: Blocked, parts: Sequence[Optional["PackedLora"]]) -> OptionalTensor:
        """The fused projection's pool read inside its own matmul (linear_cpu.c: the shrink of every part
        for a group of tokens of one adapter, the expand into the tile before it is rounded)."""
        group = parts[0].group if parts[0] is not None else None
        if group is None or group.pool is None:
            return None
        return native.linear_kernel().with_lora(x, weight, group.pool, self.step)


class PartialSums:
    """The shrink's fp32 sums of every fused projection in a forward pass, zeroed by one memset at
    the pass's start instead of one allocation and memset per projection (128 kernels of an 8B
    model's graphed decode step). A plan's first pass counts what it needs; from its second (the
    decode graphs' second warm-up, then the capture) one buffer holds them all."""

    def __init__(self) -> None:
        self.buffer: Optional[torch.Tensor] = None  # [what a pass takes] float32
        self.device: Optional[torch.device] = None
        self.taken = 0  # elements this pass has asked for so far
        self.cursor = 0  # of them, those served from the buffer

    def begin(self) -> None:
        if self.buffer is None and self.taken:
            self.buffer = torch.zeros(self.taken, dtype=torch.float32, device=self.device)
        elif self.buffer is not None:
            self.buffer.zero_()
        self.taken = self.cursor = 0

    def take(self, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
        """A zeroed fp32 tensor of `shape` for one projection's sums."""
        self.device, size = device, shape[0] * shape[1] * shape[2]
        self.taken += size
        if self.buffer is None or self.cursor + size > self.buffer.numel():
            return torch.zeros(shape, dtype=torch.float32, device=device)
        self.cursor += size
        return self.buffer[self.cursor - size : self.cursor].view(shape)


@dataclass(frozen=True)
class SortedTiles(LoraBatch):
    """The tokens sorted by adapter into tiles of up to 16 tokens of one adapter, each tile one
    matrix product each way on the tensor cores, by two Triton kernels per fused projection
    (server/kernels/lora_triton.py, CUDA): every part at once, each adapter's columns read once
    per tile. The order and the tiles live on the device, so a decode graph captured with one mix
    replays any other (DecodeGraphs refills them)."""

    columns: Optional[torch.Tensor] = None  # [5, tokens] int32 on the device: the order, then the 4 tile rows
    rank_tile: int = 16  # >= every width, a power of two (the kernels' tile)
    tile_slots: int = 0  # tiles the kernels launch for (the first ones; 0: one per token), >= those used
    tiles_used: int = 0
    sums: PartialSums = field(default_factory=PartialSums, compare=False)

    @property
    def tiles(self) -> torch.Tensor:  # [4, tile slots]
        return self.columns[1:, : self.tile_slots or None]

    def begin_pass(self) -> None:
        self.sums.begin()

    def add(self, y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b_t: torch.Tensor) -> None:
        add_lora(y, x, a.unsqueeze(1), b_t, (b_t.shape[1],), self.columns[0], self.tiles, self.rank_tile)

    def add_parts(self, y: torch.Tensor, x: torch.Tensor, parts: Sequence[Optional["PackedLora"]],
                  sizes: Sequence[int]) -> None:
        group = parts[0].group if parts[0] is not None else None
        if group is None:  # buffers made part by part (not by this tier on CUDA)
            super().add_parts(y, x, parts, sizes)
            return
        partial = self.sums.take((x.shape[0], group.a.shape[1], self.rank_tile), x.device)
        add_lora(y, x, group.a, group.b_t, tuple(sizes), self.columns[0], self.tiles, self.rank_tile, partial)


@dataclass(frozen=True)
class PackedGroup:
    """One fused projection's packed adapters, every part together: each part's PackedLora is a view
    into these, so one kernel reads all parts (the Triton kernels in one launch each way on CUDA,
    linear_cpu.c inside the projection's own matmul on CPU, where B^T is blocked like a weight)."""

    a: torch.Tensor  # [cols, parts, in]
    b_t: Optional[torch.Tensor]  # [cols, sum(out)], the parts side by side as in the projection's output; or ...
    pool: Optional[LoraPool] = None  # ... (CPU, bf16) B^T in lora_b_blocks' layout, read by linear_cpu.c through this

    @classmethod
    def zeroed(cls, columns: int, in_features: int, sizes: tuple[int, ...], device: torch.device,
               dtype: torch.dtype, folds: bool) -> "PackedGroup":
        a = torch.zeros(columns, len(sizes), in_features, device=device, dtype=dtype)
        if folds:
            return cls(a, None, native.lora_pool(a, native.lora_b_blocks(columns, sum(sizes), device), sizes))
        return cls(a, torch.zeros(columns, sum(sizes), device=device, dtype=dtype))

    @property
    def b_blocks(self) -> Optional[torch.Tensor]:
        return self.pool.tensors[1] if self.pool is not None else None

    def parts(self, sizes: tuple[int, ...]) -> list["PackedLora"]:
        """Each part's view (no B^T view where it is blocked: only linear_cpu.c reads those)."""
        out, start = [], 0
        for p, size in enumerate(sizes):
            out.append(PackedLora(self.a[:, p], None if self.b_t is None else self.b_t[:, start : start + size], self))
            start += size
        return out

    def keep(self, old: "PackedGroup", columns: int) -> None:
        """The first `columns` packed columns of `old` (same layout), copied in."""
        self.a[:columns] = old.a[:columns]
        if self.pool is not None:
            self.b_blocks[: columns // SLOT_COLUMNS] = old.b_blocks[: columns // SLOT_COLUMNS]
        else:
            self.b_t[:columns] = old.b_t[:columns]

    def write(self, lo: int, width: int, modules: Sequence[tuple[Optional[torch.Tensor], Optional[torch.Tensor]]],
              sizes: tuple[int, ...]) -> None:
        """Columns [lo, lo + width) from each part's (A [r, in], B [out, r]) (None: zeros), zeros past r."""
        self.a[lo : lo + width] = 0
        b_t = self.b_t[lo : lo + width].zero_() if self.pool is None else self.a.new_zeros(width, sum(sizes))
        start = 0
        for p, ((a, b), size) in enumerate(zip(modules, sizes)):
            if a is not None:
                self.a[lo : lo + a.shape[0], p].copy_(a, non_blocking=True)
                b_t[: a.shape[0], start : start + size].copy_(b.t(), non_blocking=True)
            start += size
        if self.pool is not None:
            self.b_blocks[lo // SLOT_COLUMNS : (lo + width) // SLOT_COLUMNS] = native.block_lora_b(b_t)


@dataclass(frozen=True)
class PackedLora:
    """The packed adapters of one projection (a part of a fused one), hung on its LoraTarget."""

    a: torch.Tensor  # [cols, in]
    b_t: Optional[torch.Tensor]  # [cols, out], scale folded in (None: blocked, read through group.pool)
    group: Optional[PackedGroup] = None  # the fused projection's buffers these are views of


def lora_delta(x: torch.Tensor, a: torch.Tensor, b_t: torch.Tensor, lora: LoraBatch) -> torch.Tensor:
    """The delta alone, [tokens, out] (for tests and benchmarks)."""
    y = x.new_zeros(x.shape[0], b_t.shape[1])
    lora.add(y, x, a, b_t)
    return y


@dataclass(frozen=True)
class LoraCosts:
    """A cost model of each method: microseconds per decoder layer (the default model's 7
    projections) on one CPU thread, fitted to bench/lora_op.py (docs/benchmarks.md); only their
    ratios matter. None: the method is not offered (slower than another everywhere measured)."""

    window_per_token_column: float
    gathered_per_token: Optional[float]
    runs_per_run: float
    groups_per_slot: Optional[float]
    sorted_per_token: float


FP32_COSTS = LoraCosts(window_per_token_column=0.21, gathered_per_token=None, runs_per_run=42,
                       groups_per_slot=10, sorted_per_token=4)
# bf16 small matmuls and the grouped kernel cost far more per call on CPU; the window and gathering don't
BF16_COSTS = LoraCosts(window_per_token_column=0.05, gathered_per_token=18, runs_per_run=175,
                       groups_per_slot=None, sorted_per_token=3)


class LoraPlanner:
    """Builds each step's LoraBatch; with a cost model (CPU) it picks the cheapest method, without
    one (CUDA) the masked window."""

    def __init__(self, device: torch.device, dtype: torch.dtype, costs: Optional[LoraCosts],
                 kernel: Optional[LoraKernel] = None, triton: bool = False) -> None:
        self.device, self.dtype, self.costs, self.kernel = device, dtype, costs, kernel
        self.triton = triton  # CUDA: SortedTiles for steps of up to SLOT_ROWS_MAX_TOKENS tokens
        self.folds = False  # CPU: linear_cpu.c reads the LoRA inside the projections (set by the tier): every step

    @classmethod
    def for_device(cls, device: torch.device, dtype: torch.dtype) -> "LoraPlanner":
        if device.type != "cpu":
            return cls(device, dtype, None, triton=device.type == "cuda" and triton_kernels() is not None)
        kernel = lora_kernel() if dtype in (torch.bfloat16, torch.float32) else None
        return cls(device, dtype, BF16_COSTS if dtype in (torch.bfloat16, torch.float16) else FP32_COSTS, kernel)

    def plan(self, ranges: Sequence[Optional[Range]], query_lens: Sequence[int]) -> Optional[LoraBatch]:
        ranges, query_lens = tuple(ranges), tuple(query_lens)
        used = sorted({r for r in ranges if r is not None})
        if not used:
            return None
        # The kernel beats every other method in every case of bench/lora_op.py at 1 and 2 threads,
        # one adapter's prefills too (bf16, per layer, 1 thread: 1 token 40 us against 193 for the
        # window; 1,024 tokens of one adapter 1.5 ms against 6.6 for OneAdapter's two matmuls; 2
        # threads: 1.6 against 4.4). It runs on one thread, so on a larger team it keeps only
        # decode-sized steps (untested there: this machine has 2 cores); folded into linear_cpu.c,
        # the LoRA shares the projections' team, and blocked B^T has no other reader: every step.
        if self.kernel is not None and (self.folds or torch.get_num_threads() <= KERNEL_ANY_STEP_THREADS
                                        or sum(query_lens) <= KERNEL_SMALL_STEP_TOKENS):
            return self._token_columns(ranges, query_lens)
        if self.triton and sum(query_lens) <= SLOT_ROWS_MAX_TOKENS:
            return self._sorted_tiles(ranges, query_lens)
        if len(used) == 1 and all(r is not None for r in ranges):
            return OneAdapter(ranges, query_lens, *used[0])
        if self.costs is None:
            return self._window(ranges, query_lens)
        return min(self._estimates(used, sum(query_lens), sum(n for r, n in zip(ranges, query_lens) if r is not None)),
                   key=lambda pair: pair[0])[1](ranges, query_lens)

    def _estimates(self, used: list[Range], tokens: int, adapter_tokens: int) -> list[tuple[float, Callable]]:
        c = self.costs
        lo, hi = used[0][0], used[-1][1]
        widths = {end - start for start, end in used}
        out = [(c.window_per_token_column * tokens * (hi - lo), self._window),
               (c.runs_per_run * len(used) + c.sorted_per_token * adapter_tokens, self._runs)]
        if c.groups_per_slot is not None and widths == {SLOT_COLUMNS}:
            out.append((c.groups_per_slot * (hi - lo) / SLOT_COLUMNS + c.sorted_per_token * adapter_tokens,
                        self._groups))
        if c.gathered_per_token is not None and len(widths) == 1:
            out.append((c.gathered_per_token * adapter_tokens, self._gathered))
        return out

    def _window(self, ranges: Ranges, query_lens: tuple[int, ...]) -> MaskedWindow:
        lo = min(r[0] for r in ranges if r is not None)
        hi = max(r[1] for r in ranges if r is not None)
        mask = torch.zeros(sum(query_lens), hi - lo, dtype=self.dtype)
        start = 0
        for r, n in zip(ranges, query_lens):
            if r is not None:
                mask[start : start + n, r[0] - lo : r[1] - lo] = 1
            start += n
        return MaskedWindow(ranges, query_lens, lo, hi, mask.to(self.device))

    def _sorted_tiles(self, ranges: Ranges, query_lens: tuple[int, ...]) -> SortedTiles:
        lo, width = LoraBatch(ranges, query_lens).token_columns()
        order, tiles = plan_tiles(lo, width, max_tiles=len(lo))
        columns = torch.tensor([order, *tiles], dtype=torch.int32).to(self.device, non_blocking=True)
        used = sum(1 for w in tiles[3] if w > 0)
        return SortedTiles(ranges, query_lens, columns, rank_block(max(width)), max(used, 1), used)

    def _token_columns(self, ranges: Ranges, query_lens: tuple[int, ...]) -> TokenColumns:
        lo, width = LoraBatch(ranges, query_lens).token_columns()
        order = sorted(range(len(lo)), key=lambda t: (lo[t], width[t]))  # stable: rows ascending per adapter
        as_tensor = lambda v: torch.tensor(v, dtype=torch.int32)  # noqa: E731
        return TokenColumns(ranges, query_lens, self.kernel.step(as_tensor(lo), as_tensor(width), as_tensor(order)))

    def _sorted_tokens(self, ranges: Ranges, query_lens: tuple[int, ...]) -> list[tuple[Range, int]]:
        """(range, token row) of every adapter token, sorted by the range (stable: rows ascending)."""
        rows, start = [], 0
        for r, n in zip(ranges, query_lens):
            if r is not None:
                rows.extend((r, start + i) for i in range(n))
            start += n
        return sorted(rows, key=lambda pair: pair[0])

    def _gathered(self, ranges: Ranges, query_lens: tuple[int, ...]) -> GatheredRows:
        rows, columns, start = [], [], 0
        for r, n in zip(ranges, query_lens):
            if r is not None:
                rows.extend(range(start, start + n))
                columns.extend(c for _ in range(n) for c in range(*r))
            start += n
        width = next(hi - lo for lo, hi in (r for r in ranges if r is not None))
        as_tensor = lambda v: torch.tensor(v, dtype=torch.long, device=self.device)  # noqa: E731
        return GatheredRows(ranges, query_lens, as_tensor(rows), as_tensor(columns), width)

    def _runs(self, ranges: Ranges, query_lens: tuple[int, ...]) -> SortedRuns:
        tokens = self._sorted_tokens(ranges, query_lens)
        runs, start = [], 0
        for i in range(1, len(tokens) + 1):
            if i == len(tokens) or tokens[i][0] != tokens[start][0]:
                runs.append((start, i, *tokens[start][0]))
                start = i
        order = torch.tensor([row for _, row in tokens], dtype=torch.long, device=self.device)
        return SortedRuns(ranges, query_lens, order, tuple(runs))

    def _groups(self, ranges: Ranges, query_lens: tuple[int, ...]) -> SortedGroups:
        tokens = self._sorted_tokens(ranges, query_lens)
        first = tokens[0][0][0] // SLOT_COLUMNS
        slots = tokens[-1][0][0] // SLOT_COLUMNS - first + 1
        counts = [0] * slots
        for r, _ in tokens:
            counts[r[0] // SLOT_COLUMNS - first] += 1
        order = torch.tensor([row for _, row in tokens], dtype=torch.long, device=self.device)
        offsets = torch.tensor(counts, dtype=torch.int32).cumsum(0, dtype=torch.int32).to(self.device)
        return SortedGroups(ranges, query_lens, order, offsets, first, slots)


class ColumnAllocator:
    """First-fit allocation of column ranges in the packed buffers; freed ranges are reused."""

    def __init__(self) -> None:
        self.free: list[tuple[int, int]] = []  # sorted, non-adjacent holes below `end`
        self.end = 0  # columns in use lie below this

    def allocate(self, width: int) -> int:
        for i, (lo, hi) in enumerate(self.free):
            if hi - lo >= width:
                self.free[i : i + 1] = [(lo + width, hi)] if hi - lo > width else []
                return lo
        self.end += width
        return self.end - width

    def release(self, lo: int, hi: int) -> None:
        holes = sorted([*self.free, (lo, hi)])
        merged: list[tuple[int, int]] = []
        for hole in holes:
            if merged and merged[-1][1] == hole[0]:
                merged[-1] = (merged[-1][0], hole[1])
            else:
                merged.append(hole)
        if merged and merged[-1][1] == self.end:  # a hole at the top just lowers the end
            self.end = merged.pop()[0]
        self.free = merged


def slot_width(rank: int) -> int:
    """Packed columns an adapter of this rank occupies: whole slots."""
    return -(-rank // SLOT_COLUMNS) * SLOT_COLUMNS


class ResidentAdapters:
    """The device tier: adapters packed into the model's projections, bounded by `max_bytes` (and
    by `max_active` adapters when that is not 0).

    Each projection owns two buffers (A rows, B^T rows) with one column range (whole slots) per
    resident adapter. Activating writes only the new adapter's columns (zeros where it has no
    weights, so a reused range never leaks an evicted adapter); evicting frees the range. On CPU
    a step's adapters are kept side by side (`_pack_together`), and with `preallocate` the buffers
    are made whole once (`make_pool` on the first load's thread, else the first activation);
    otherwise they grow by doubling (`_grow_to`).
    """

    def __init__(self, model: CausalLM, max_active: int, max_bytes: int, preallocate: bool = False) -> None:
        self.projections: dict[tuple[int, str], LoraTarget] = model.lora_targets()
        self.groups = model.lora_groups()
        self._blocked = [p.blocked is not None for _, p in model.fused_projections()]  # (CPU, bf16: linear_cpu.c)
        self._packed: list[PackedGroup] = []  # one per group, in the order of self.groups
        for module in self.projections.values():
            module.lora = None  # this tier owns the model's LoRA buffers from now on
        self.max_active, self.max_bytes = max_active, max_bytes
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.active: list[AdapterWeights] = []  # least recently used first
        self._columns: dict[AdapterWeights, tuple[int, int]] = {}
        self._by_key: dict[AdapterKey, AdapterWeights] = {}  # read by other threads: one dict lookup
        self._allocator = ColumnAllocator()
        self.planner = LoraPlanner.for_device(self.device, self.dtype)
        self.planner.folds = any(self._folds(keys, blocked) for keys, blocked in zip(self.groups, self._blocked))
        # bytes of one packed column across every projection (its A row and its B^T row)
        features = sum(m.in_features + m.out_features for m in self.projections.values())
        self._column_bytes = features * self.dtype.itemsize
        self.capacity = 0
        self.preallocated = preallocate
        self._made: Optional[list[PackedGroup]] = None  # make_pool's buffers
        self._pool_claimed = False  # a loader has made (or tried to make) the pool, or the engine made its own
        self._making = threading.Lock()
        self.loads = 0
        self.evictions = 0
        self.relocations = 0  # adapters moved next to the rest of their batch (_pack_together)

    def warm_up_kernels(self) -> None:
        """CUDA: compile the Triton kernels for this model's fused projections before serving."""
        if not self.planner.triton:
            return
        shapes = {(len(keys), self.projections[keys[0]].in_features,
                   tuple(self.projections[key].out_features for key in keys)) for keys in self.groups}
        try:
            seconds = lora_triton.warm_up(shapes, self.device, self.dtype)
        except Exception as exc:  # noqa: BLE001 (no C compiler for Triton's launcher, an unsupported GPU, ...)
            log.warning("the Triton LoRA kernels do not build here (%s): LoRA uses torch matmuls", exc)
            self.planner.triton = False
            return
        log.info("Triton LoRA kernels ready for %d projection shapes in %.1f s", len(shapes), seconds)

    def is_active(self, adapter: AdapterWeights) -> bool:
        return adapter in self._columns

    def activate(self, adapter: AdapterWeights, pinned: set[AdapterWeights]) -> bool:
        """Make `adapter` resident, evicting the least recently used unpinned one if full.
        Returns False when the memory (or the count cap) is taken by adapters of running requests."""
        if self.is_active(adapter):
            return True
        while self._full_for(adapter):
            victim = next((a for a in self.active if a not in pinned), None)
            if victim is None:
                return False
            self.evict(victim)
        width = slot_width(adapter.rank)
        lo = self._allocator.allocate(width)
        self._grow_to(self._allocator.end)
        self._write(adapter, lo, width)
        self._columns[adapter] = (lo, lo + width)
        self._by_key[adapter.key] = adapter
        self.active.append(adapter)
        self.loads += 1
        return True

    def _full_for(self, adapter: AdapterWeights) -> bool:
        over_count = 0 < self.max_active <= len(self.active)
        return over_count or self.bytes_used + self.bytes_of(adapter) > self.max_bytes

    def bytes_of(self, adapter: AdapterWeights) -> int:
        """Device bytes of the adapter's packed columns (whole slots) in every projection."""
        return slot_width(adapter.rank) * self._column_bytes

    @property
    def bytes_used(self) -> int:
        return sum(self.bytes_of(a) for a in self.active)

    def can_ever_hold(self, adapter: AdapterWeights) -> bool:
        return self.bytes_of(adapter) <= self.max_bytes

    def resident(self, key: AdapterKey) -> Optional[AdapterWeights]:
        """The resident adapter with this key, if any (safe to call from any thread)."""
        return self._by_key.get(key)

    def evict(self, adapter: AdapterWeights) -> None:
        if self._by_key.get(adapter.key) is adapter:
            del self._by_key[adapter.key]
        self.active.remove(adapter)
        self._allocator.release(*self._columns.pop(adapter))
        self.evictions += 1

    def touch(self, adapter: AdapterWeights) -> None:
        """Mark as most recently used (eviction takes from the front)."""
        if adapter in self.active and self.active[-1] is not adapter:
            self.active.remove(adapter)
            self.active.append(adapter)

    def _grow_to(self, columns: int) -> None:
        """Room for `columns` packed columns: new buffers, zeroed, the old columns copied in. With
        `preallocate` (the builder's choice on CPU) the whole pool the budget allows is made by
        the first load's loader thread (make_pool), else by the first activation, so no later
        one waits for a regrowth or pays first-touch page faults (measured: 1.6 ms an activation
        against 14 in untouched buffers); past it only by the fragment a wider adapter lacks
        among the holes. Otherwise the buffers start small and double: a CUDA graph's window spans
        the whole capacity, so it is kept near what is in use."""
        if columns <= self.capacity:
            return
        if self.preallocated and not self.capacity and self._install_made(columns):
            return
        if self.preallocated:
            new_capacity = max(columns, self._budget_columns()) if not self.capacity else columns + 4 * SLOT_COLUMNS
        else:
            new_capacity = max(columns, 2 * self.capacity, 16)
        groups = self._zeroed(new_capacity)
        for new, old in zip(groups, self._packed if self.capacity else []):
            new.keep(old, self.capacity)
        self._install(groups)

    def _folds(self, keys: tuple[tuple[int, str], ...], blocked: bool) -> bool:
        """Whether this group's LoRA is read inside its projection's matmul (linear_cpu.c)."""
        sizes = tuple(self.projections[key].out_features for key in keys)
        return blocked and self.planner.kernel is not None and self.dtype == torch.bfloat16 and foldable(sizes)

    def _zeroed(self, columns: int) -> list[PackedGroup]:
        """New zeroed buffers, one PackedGroup per fused projection (A rows [columns, parts, in], B^T
        rows [columns, out] or blocked where linear_cpu.c folds the LoRA in)."""
        groups = []
        for keys, blocked in zip(self.groups, self._blocked):
            parts = [self.projections[key] for key in keys]
            groups.append(PackedGroup.zeroed(columns, parts[0].in_features, tuple(m.out_features for m in parts),
                                             self.device, self.dtype, self._folds(keys, blocked)))
        return groups

    def _install(self, groups: list[PackedGroup]) -> None:
        """Hang each part's view on its projection's LoraTarget."""
        for keys, group in zip(self.groups, groups):
            for key, packed in zip(keys, group.parts(tuple(self.projections[key].out_features for key in keys))):
                self.projections[key].lora = packed
        self._packed, self.capacity = groups, groups[0].a.shape[0] if groups else 0

    def make_pool(self) -> None:
        """On a loader thread, ahead of the first activation: the preallocated pool's buffers,
        allocated and zeroed. Made on the engine thread at that activation, they stalled every
        running stream for it (0.24 s for the default 1 GB in-process, ~1.5 s through the server
        on the development VM, whose fresh memory is slow)."""
        with self._making:
            if not self.preallocated or self._pool_claimed:
                return
            self._pool_claimed = True  # once: a failure is not retried by every later load
            try:
                self._made = self._zeroed(self._budget_columns())
            except RuntimeError as exc:  # out of memory: the first activation tries again and reports it
                log.warning("could not make the adapter pool ahead of its first use: %s", exc)

    def _install_made(self, columns: int) -> bool:
        """The buffers make_pool made, if it has (waiting while a loader is still making them). No
        loader makes another after this, whether or not there was one to install."""
        with self._making:
            made, self._made, self._pool_claimed = self._made, None, True
        made_columns = made[0].a.shape[0] if made else 0
        if columns > made_columns:
            return False
        self._install(made)
        return True

    def _budget_columns(self) -> int:
        return self.max_bytes // self._column_bytes // SLOT_COLUMNS * SLOT_COLUMNS

    def _write(self, adapter: AdapterWeights, lo: int, width: int) -> None:
        """The adapter's A rows and B^T rows (read in the serving dtype and this orientation, so these
        are plain copies), zeros past its rank and where it has no module: a reused range keeps
        nothing of the adapter it held before."""
        for keys, group in zip(self.groups, self._packed):
            group.write(lo, width, [adapter.modules.get(key, (None, None)) for key in keys],
                        tuple(self.projections[key].out_features for key in keys))

    def batch_for(
        self, row_adapters: Sequence[Optional[AdapterWeights]], query_lens: Sequence[int]
    ) -> Optional[LoraBatch]:
        """The LoraBatch for a step whose sequence i uses row_adapters[i] for query_lens[i] tokens."""
        if self.device.type == "cpu" and self.planner.kernel is None:  # (the kernel reads columns wherever they are)
            self._pack_together({a for a in row_adapters if a is not None})
        return self.planner.plan([self._columns[a] if a is not None else None for a in row_adapters], query_lens)

    def _pack_together(self, step: set[AdapterWeights]) -> None:
        """Keep the step's adapters side by side, so its masked window spans only them: a window
        over 32 adapters scattered among 64 resident reads twice the columns it needs (bf16 CPU:
        1,339 us per layer against 685 packed, bench/lora_op.py). When the step's adapters (all
        as wide) spread over more than their own width plus SPREAD_SLACK more, each one outside
        the lowest ranges of that width trades places with an adapter this step does not use.
        Checked every step; batches change slowly, so it moves columns only when one joins."""
        widths = {self._columns[a][1] - self._columns[a][0] for a in step}
        if len(step) < 2 or len(widths) != 1:
            return
        width = widths.pop()
        starts = sorted(self._columns[a][0] for a in step)
        if starts[-1] + width - starts[0] <= (len(step) + SPREAD_SLACK) * width:
            return
        same_width = sorted((r[0], a) for a, r in self._columns.items() if r[1] - r[0] == width)
        front = same_width[: len(step)]
        outside = [a for _, a in same_width[len(step) :] if a in step]
        displaced = [a for _, a in front if a not in step]
        self._swap(list(zip(outside, displaced)), width)

    def _swap(self, pairs: list[tuple[AdapterWeights, AdapterWeights]], width: int) -> None:
        """Exchange the packed columns of each pair, in every projection: one gather and one
        scatter per buffer for all the pairs together."""
        if not pairs:
            return
        src, dst = [], []
        for a, b in pairs:
            (a_lo, _), (b_lo, _) = self._columns[a], self._columns[b]
            src += [*range(a_lo, a_lo + width), *range(b_lo, b_lo + width)]
            dst += [*range(b_lo, b_lo + width), *range(a_lo, a_lo + width)]
            self._columns[a], self._columns[b] = (b_lo, b_lo + width), (a_lo, a_lo + width)
        src_index = torch.tensor(src, device=self.device)
        dst_index = torch.tensor(dst, device=self.device)
        for group in self._packed:  # (never blocked: only without the C kernels)
            for buffer in (group.a, group.b_t):
                buffer.index_copy_(0, dst_index, buffer.index_select(0, src_index))
        self.relocations += len(pairs)
