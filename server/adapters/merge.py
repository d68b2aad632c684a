"""Merging several LoRA adapters into one per request (LoRAX's `merged_adapters`).

`linear` is exact: the merged delta is sum_i w_i * B_i A_i, obtained by concatenating the ranks
(A stacked, B side by side with w_i folded in), so adapters of any rank and target set combine.
`ties`, `dare_linear` and `dare_ties` work on the task tensors themselves (A and B separately,
as LoRAX and peft do), which needs equal ranks per module. DARE's random drop is seeded from the
merge spec, so one spec always yields the same merged adapter (it is cached by that spec).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Sequence

import torch

from server.adapters.weights import AdapterKey, AdapterWeights, LoraPair
from server.errors import ValidationError

STRATEGIES = ("linear", "ties", "dare_linear", "dare_ties")
SIGN_METHODS = ("total", "frequency")
MAX_MERGED = 8


@dataclass(frozen=True)
class MergeSpec:
    ids: tuple[str, ...]
    weights: tuple[float, ...]
    strategy: str = "linear"
    density: float = 1.0
    majority_sign_method: str = "total"
    source: str | None = None

    @classmethod
    def parse(cls, raw: dict, source: str | None) -> "MergeSpec":
        ids = raw.get("ids")
        if not isinstance(ids, list) or not ids or not all(isinstance(i, str) and i for i in ids):
            raise ValidationError("merged_adapters.ids must be a non-empty list of adapter ids")
        if len(ids) > MAX_MERGED:
            raise ValidationError(f"merged_adapters.ids holds at most {MAX_MERGED} adapters")
        weights = raw.get("weights") or [1.0] * len(ids)
        if len(weights) != len(ids) or not all(isinstance(w, (int, float)) for w in weights):
            raise ValidationError("merged_adapters.weights must be numbers, one per id")
        spec = cls(tuple(ids), tuple(float(w) for w in weights), raw.get("merge_strategy", "linear"),
                   float(raw.get("density", 1.0)), raw.get("majority_sign_method", "total"), source)
        if spec.strategy not in STRATEGIES:
            raise ValidationError(f"merged_adapters.merge_strategy must be one of {', '.join(STRATEGIES)}")
        if not 0.0 < spec.density <= 1.0:
            raise ValidationError("merged_adapters.density must be in (0, 1]")
        if spec.majority_sign_method not in SIGN_METHODS:
            raise ValidationError(f"merged_adapters.majority_sign_method must be one of {', '.join(SIGN_METHODS)}")
        return spec

    @property
    def key(self) -> AdapterKey:
        return AdapterKey("merged", json.dumps(self.__dict__, sort_keys=True, separators=(",", ":")))

    @property
    def seed(self) -> int:
        return int.from_bytes(hashlib.sha256(self.key.id.encode()).digest()[:8], "little")


def merge(spec: MergeSpec, parts: Sequence[AdapterWeights]) -> AdapterWeights:
    """Computed in float32 from the parts (held in the serving dtype), the result in theirs."""
    modules = sorted({m for p in parts for m in p.modules})
    pairs = [{m: (a.float(), b.float()) for m, (a, b) in p.modules.items()} for p in parts]
    if spec.strategy == "linear":
        merged = {m: _linear_concat([p.get(m) for p in pairs], spec.weights) for m in modules}
    else:
        generator = torch.Generator().manual_seed(spec.seed)
        merged = {m: _task_merge(spec, m, [p.get(m) for p in pairs], generator) for m in modules}
    dtype = parts[0].dtype
    return AdapterWeights(key=spec.key, rank=max(a.shape[0] for a, _ in merged.values()),
                          modules={m: (a.to(dtype), b.to(dtype)) for m, (a, b) in merged.items()})


def _linear_concat(pairs: Sequence[LoraPair | None], weights: Sequence[float]) -> LoraPair:
    present = [(p, w) for p, w in zip(pairs, weights) if p is not None]
    a = torch.cat([p[0] for p, _ in present])  # [sum r, in]
    b = torch.cat([p[1] * w for p, w in present], dim=1)  # [out, sum r]
    return a, b


def _task_merge(spec: MergeSpec, module, pairs, generator: torch.Generator) -> LoraPair:
    if any(p is None for p in pairs) or len({p[0].shape for p in pairs}) != 1:
        raise ValidationError(
            f"merge_strategy {spec.strategy} needs every adapter to target {module[1]} with the same rank; "
            "use linear to merge adapters of different ranks or targets"
        )
    weights = torch.tensor(spec.weights)
    return tuple(_merge_tensors(spec, torch.stack([p[i] for p in pairs]), weights, generator) for i in (0, 1))


def _merge_tensors(spec: MergeSpec, tensors: torch.Tensor, weights: torch.Tensor,
                   generator: torch.Generator) -> torch.Tensor:
    """tensors: [n, ...] the same tensor from n adapters; returns the merged [...]."""
    dare = spec.strategy.startswith("dare")
    pruned = random_prune(tensors, spec.density, generator) if dare else magnitude_prune(tensors, spec.density)
    weighted = pruned * weights.view(-1, *([1] * (pruned.dim() - 1)))
    if spec.strategy == "dare_linear":
        return weighted.sum(0)
    return disjoint_merge(weighted, sign_agreement(pruned, spec.majority_sign_method))


def magnitude_prune(tensors: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the top `density` fraction of each adapter's entries by magnitude (TIES trim)."""
    if density >= 1.0:
        return tensors
    flat = tensors.reshape(tensors.shape[0], -1)
    k = max(1, int(density * flat.shape[1]))
    threshold = flat.abs().kthvalue(flat.shape[1] - k + 1, dim=1, keepdim=True).values
    return (flat * (flat.abs() >= threshold)).view_as(tensors)


def random_prune(tensors: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """DARE: drop entries with probability 1 - density and rescale survivors by 1 / density."""
    if density >= 1.0:
        return tensors
    keep = torch.rand(tensors.shape, generator=generator) < density
    return tensors * keep / density


def sign_agreement(tensors: torch.Tensor, method: str) -> torch.Tensor:
    """[n, ...] mask of entries whose sign matches the elected one: the sign of the summed values
    (total) or of the sign count (frequency). Zeros (pruned entries) never agree."""
    votes = tensors.sign().sum(0) if method == "frequency" else tensors.sum(0)
    elected = torch.where(votes >= 0, 1.0, -1.0)
    return tensors.sign() == elected


def disjoint_merge(weighted: torch.Tensor, agree: torch.Tensor) -> torch.Tensor:
    """Per entry, the sum of the agreeing weighted values over how many agree."""
    return (weighted * agree).sum(0) / agree.sum(0).clamp(min=1)
