"""Batched multi-LoRA: y = W x + B_a (A_a x) for every row's own adapter a, in one pass.

The device tier packs every resident adapter's A and B (scale folded into B) side by side along
the rank axis of each target projection. A step uses the column window covering the adapters in
its batch; a 0/1 mask keeps each row on its own adapter's columns. That is two small matmuls per
projection however many adapters the batch mixes (no per-adapter loop, no gather of weights), and
no mask at all when the batch uses a single adapter.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from server.adapters.weights import AdapterWeights
from server.model.decoder import CausalLM
from server.model.layers import LoraTarget


@dataclass(frozen=True)
class LoraBatch:
    """Which packed columns a step uses, and which of them each token may use."""

    lo: int
    hi: int
    mask: Optional[torch.Tensor]  # [tokens, hi - lo] 0/1 in the model dtype; None: every row uses all


def lora_delta(x: torch.Tensor, a_packed: torch.Tensor, b_packed_t: torch.Tensor, lora: LoraBatch) -> torch.Tensor:
    """x: [tokens, in]; a_packed: [cols, in]; b_packed_t: [cols, out] (scaled). Returns [tokens, out]."""
    xa = torch.nn.functional.linear(x, a_packed[lora.lo : lora.hi])  # [tokens, window]
    if lora.mask is not None:
        xa = xa * lora.mask
    return xa @ b_packed_t[lora.lo : lora.hi]


@dataclass(frozen=True)
class PackedLora:
    """The packed adapters of one projection; its LoraTarget calls it when the batch carries LoRA."""

    a: torch.Tensor  # [cols, in]
    b_t: torch.Tensor  # [cols, out], scale folded in

    def __call__(self, x: torch.Tensor, lora: LoraBatch) -> torch.Tensor:
        return lora_delta(x, self.a, self.b_t, lora)


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


class ResidentAdapters:
    """The device tier: at most `max_active` adapters packed into the model's projections.

    Each projection owns two buffers (A rows, B^T rows) with one column range per resident adapter.
    Activating writes only the new adapter's columns (zeros where it has no weights, so a reused
    range never leaks an evicted adapter); evicting frees the range. Buffers grow by doubling.
    """

    def __init__(self, model: CausalLM, max_active: int, max_bytes: int) -> None:
        self.projections: dict[tuple[int, str], LoraTarget] = model.lora_targets()
        for module in self.projections.values():
            module.lora = None  # this tier owns the model's LoRA buffers from now on
        self.max_active, self.max_bytes = max_active, max_bytes
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.active: list[AdapterWeights] = []  # least recently used first
        self._columns: dict[AdapterWeights, tuple[int, int]] = {}
        self._allocator = ColumnAllocator()
        self.capacity = 0
        self.loads = 0
        self.evictions = 0

    def is_active(self, adapter: AdapterWeights) -> bool:
        return adapter in self._columns

    def activate(self, adapter: AdapterWeights, pinned: set[AdapterWeights]) -> bool:
        """Make `adapter` resident, evicting the least recently used unpinned one if full.
        Returns False when every slot is pinned by running requests."""
        if self.is_active(adapter):
            return True
        while len(self.active) >= self.max_active or self.bytes_used + self.bytes_of(adapter) > self.max_bytes:
            victim = next((a for a in self.active if a not in pinned), None)
            if victim is None:
                return False
            self.evict(victim)
        lo = self._allocator.allocate(adapter.rank)
        self._grow_to(self._allocator.end)
        self._write(adapter, lo)
        self._columns[adapter] = (lo, lo + adapter.rank)
        self.active.append(adapter)
        self.loads += 1
        return True

    def bytes_of(self, adapter: AdapterWeights) -> int:
        """Device bytes of the adapter's packed columns in every projection."""
        per_column = sum(m.in_features + m.out_features for m in self.projections.values())
        return adapter.rank * per_column * torch.finfo(self.dtype).bits // 8

    @property
    def bytes_used(self) -> int:
        return sum(self.bytes_of(a) for a in self.active)

    def can_ever_hold(self, adapter: AdapterWeights) -> bool:
        return self.bytes_of(adapter) <= self.max_bytes

    def evict(self, adapter: AdapterWeights) -> None:
        self.active.remove(adapter)
        self._allocator.release(*self._columns.pop(adapter))
        self.evictions += 1

    def touch(self, adapter: AdapterWeights) -> None:
        """Mark as most recently used (eviction takes from the front)."""
        if adapter in self.active and self.active[-1] is not adapter:
            self.active.remove(adapter)
            self.active.append(adapter)

    def _grow_to(self, columns: int) -> None:
        if columns <= self.capacity:
            return
        new_capacity = max(columns, 2 * self.capacity, 16)
        for module in self.projections.values():
            a = torch.zeros(new_capacity, module.in_features, device=self.device, dtype=self.dtype)  # [cols, in]
            b_t = torch.zeros(new_capacity, module.out_features, device=self.device, dtype=self.dtype)  # [cols, out]
            if module.lora is not None and self.capacity:  # (lora left by an earlier tier on this model: replaced)
                a[: self.capacity] = module.lora.a
                b_t[: self.capacity] = module.lora.b_t
            module.lora = PackedLora(a, b_t)
        self.capacity = new_capacity

    def _write(self, adapter: AdapterWeights, lo: int) -> None:
        hi = lo + adapter.rank
        for key, (a, b) in adapter.to_device(self.device, self.dtype).items():
            self.projections[key].lora.a[lo:hi] = a
            self.projections[key].lora.b_t[lo:hi] = b.t()
        for key, module in self.projections.items():
            if key not in adapter.modules:  # untargeted here: clear whatever the range held before
                module.lora.a[lo:hi] = 0
                module.lora.b_t[lo:hi] = 0

    def batch_for(
        self, row_adapters: Sequence[Optional[AdapterWeights]], query_lens: Sequence[int]
    ) -> Optional[LoraBatch]:
        """The LoraBatch for a step whose sequence i uses row_adapters[i] for query_lens[i] tokens."""
        ranges = [self._columns[a] if a is not None else None for a in row_adapters]
        used = [r for r in ranges if r is not None]
        if not used:
            return None
        lo, hi = min(r[0] for r in used), max(r[1] for r in used)
        if all(r == (lo, hi) for r in ranges):
            return LoraBatch(lo, hi, None)  # one adapter for every row: no mask needed
        mask = torch.zeros(sum(query_lens), hi - lo, dtype=self.dtype)
        start = 0
        for r, n in zip(ranges, query_lens):
            if r is not None:
                mask[start : start + n, r[0] - lo : r[1] - lo] = 1
            start += n
        return LoraBatch(lo, hi, mask.to(self.device))
