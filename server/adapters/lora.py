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

from server.adapters.weights import PROJECTIONS, AdapterWeights
from server.model.llama import CausalLM, Projection


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


def lora_reference(x: torch.Tensor, adapters: Sequence[Optional[tuple[torch.Tensor, torch.Tensor]]]) -> torch.Tensor:
    """Row-by-row float64 reference: adapters[i] is (A [r, in], B_scaled [out, r]) or None."""
    rows = []
    for xi, pair in zip(x.double(), adapters):
        if pair is None:
            rows.append(torch.zeros(0, dtype=torch.float64))
            continue
        a, b = (t.double() for t in pair)
        rows.append(b @ (a @ xi))
    out = max((r.numel() for r in rows), default=0)
    return torch.stack([r if r.numel() else torch.zeros(out, dtype=torch.float64) for r in rows])


@dataclass(frozen=True)
class PackedLora:
    """The packed adapters of one projection; a Projection calls it when its batch carries LoRA."""

    a: torch.Tensor  # [cols, in]
    b_t: torch.Tensor  # [cols, out], scale folded in

    def __call__(self, x: torch.Tensor, lora: LoraBatch) -> torch.Tensor:
        return lora_delta(x, self.a, self.b_t, lora)


def target_projections(model: CausalLM) -> dict[tuple[int, str], Projection]:
    """(layer index, projection name) -> the model's Projection module."""
    found: dict[tuple[int, str], Projection] = {}
    for index, layer in enumerate(model.model.layers):
        for name in PROJECTIONS:
            parent = layer.self_attn if name in ("q_proj", "k_proj", "v_proj", "o_proj") else layer.mlp
            found[(index, name)] = getattr(parent, name)
    return found


class ResidentAdapters:
    """The device tier: at most `max_active` adapters packed into the model's projections."""

    def __init__(self, model: CausalLM, max_active: int) -> None:
        self.projections = target_projections(model)
        self.max_active = max_active
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.active: list[AdapterWeights] = []  # packing order
        self._columns: dict[AdapterWeights, tuple[int, int]] = {}
        self._device_copies: dict[AdapterWeights, dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]] = {}
        self.loads = 0
        self.evictions = 0

    def is_active(self, adapter: AdapterWeights) -> bool:
        return adapter in self._columns

    def activate(self, adapter: AdapterWeights, pinned: set[AdapterWeights]) -> bool:
        """Make `adapter` resident, evicting the least recently activated unpinned one if full.
        Returns False when every slot is pinned by running requests."""
        if self.is_active(adapter):
            return True
        if len(self.active) >= self.max_active:
            victim = next((a for a in self.active if a not in pinned), None)
            if victim is None:
                return False
            self.evict(victim)
        self._device_copies[adapter] = adapter.to_device(self.device, self.dtype)
        self.active.append(adapter)
        self.loads += 1
        self._repack()
        return True

    def evict(self, adapter: AdapterWeights) -> None:
        self.active.remove(adapter)
        del self._device_copies[adapter]
        self.evictions += 1
        self._repack()

    def touch(self, adapter: AdapterWeights) -> None:
        """Mark as most recently used (eviction takes from the front)."""
        if adapter in self.active and self.active[-1] is not adapter:
            self.active.remove(adapter)
            self.active.append(adapter)

    def _repack(self) -> None:
        self._columns, offset = {}, 0
        for adapter in self.active:
            self._columns[adapter] = (offset, offset + adapter.rank)
            offset += adapter.rank
        for key, module in self.projections.items():
            if not self.active:
                module.lora = None
                continue
            a_parts, b_parts = [], []
            for adapter in self.active:
                a, b = self._device_copies[adapter].get(key) or (None, None)
                a_parts.append(a if a is not None else module.weight.new_zeros(adapter.rank, module.in_features))
                b_parts.append(b.t() if b is not None else module.weight.new_zeros(adapter.rank, module.out_features))
            module.lora = PackedLora(torch.cat(a_parts).contiguous(), torch.cat(b_parts).contiguous())

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
