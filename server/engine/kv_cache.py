"""Slot-based KV cache: one slot per running sequence, capacity grown on demand.

Slots are kept dense (running sequences occupy 0..n-1) so a decode step attends over a view of
the cache instead of a gathered copy; when a sequence leaves, the last slot moves into its hole.
"""

from __future__ import annotations

import torch

from server.model.arch import ArchConfig

_GROWTH_QUANTUM = 256  # tokens; capacity grows in these steps to bound re-allocations


class KVCache:
    def __init__(
        self, arch: ArchConfig, max_slots: int, max_tokens_per_slot: int, device: torch.device, dtype: torch.dtype
    ) -> None:
        self.arch, self.max_slots, self.max_tokens = arch, max_slots, max_tokens_per_slot
        self.device, self.dtype = device, dtype
        self.capacity = 0
        self.keys: list[torch.Tensor] = []  # per layer: [slots, kv_heads, capacity, head_dim]
        self.values: list[torch.Tensor] = []
        self._owners: list[object | None] = [None] * max_slots

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.keys[index], self.values[index]

    @property
    def used_slots(self) -> int:
        return sum(owner is not None for owner in self._owners)

    def allocate(self, owner: object) -> int:
        """Give `owner` the lowest free slot (dense slots keep decode views contiguous)."""
        slot = self._owners.index(None)
        self._owners[slot] = owner
        return slot

    def free(self, slot: int) -> tuple[object, int] | None:
        """Release `slot`; if it leaves a hole, move the last used slot into it.

        Returns (moved owner, its new slot) so the caller can update that owner's slot id.
        """
        self._owners[slot] = None
        last = max((i for i, o in enumerate(self._owners) if o is not None), default=-1)
        if last <= slot:
            return None
        for k, v in zip(self.keys, self.values):
            k[slot].copy_(k[last])
            v[slot].copy_(v[last])
        owner, self._owners[last] = self._owners[last], None
        self._owners[slot] = owner
        return owner, slot

    def ensure_capacity(self, tokens: int) -> None:
        """Grow every slot to hold at least `tokens` positions, keeping what is cached."""
        if tokens <= self.capacity:
            return
        if tokens > self.max_tokens:
            raise ValueError(f"sequence of {tokens} tokens exceeds the cache limit {self.max_tokens}")
        new_capacity = min(self.max_tokens, -(-tokens // _GROWTH_QUANTUM) * _GROWTH_QUANTUM)
        shape = (self.max_slots, self.arch.num_kv_heads, new_capacity, self.arch.head_dim)
        grown_k, grown_v = [], []
        for i in range(self.arch.num_layers):
            k = torch.zeros(shape, device=self.device, dtype=self.dtype)
            v = torch.zeros(shape, device=self.device, dtype=self.dtype)
            if self.capacity:
                k[:, :, : self.capacity].copy_(self.keys[i])
                v[:, :, : self.capacity].copy_(self.values[i])
            grown_k.append(k)
            grown_v.append(v)
        self.keys, self.values, self.capacity = grown_k, grown_v, new_capacity
