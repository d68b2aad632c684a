"""The decoder's building blocks: projections that carry per-row LoRA deltas (fused where the
inputs are shared), their CPU weights prepacked (blocked for linear_cpu.c in bf16 on CPUs with
AVX512-BF16, else in oneDNN's layout), their optional int8 copies for small CPU decode steps, and the
two RMSNorms.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from server.kernels.elementwise import fused_kernels
from server.kernels.native import BlockedInt8, BlockedWeight, linear_kernel
from server.model.arch import Norm


class LoraTarget(nn.Module):
    """Where the adapter tier hangs one projection's packed LoRA (`lora`, a PackedLora or None).

    The model never imports the adapter code: a Projection hands its parts' `lora` to the step's
    plan (`batch.lora.add_parts`), which adds the deltas.
    """

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.lora: Any = None


INT8_MAX_ROWS = 4  # int8 matmuls beat float ones up to this many rows on CPU (bench/step_time.py)


@dataclass(frozen=True)
class Int8Weight:
    """Weight-only int8 copy of a float weight, one scale per output row (symmetric): blocked for
    linear_cpu.c's int8 kernel where it runs (fp32 scales, the bias inside), else for torch's."""

    values: Optional[torch.Tensor]  # [out, in] int8 (torch's kernel)
    scales: Optional[torch.Tensor]  # [out] in the model dtype (torch's kernel)
    blocked: Optional[BlockedInt8] = None

    @classmethod
    def of(cls, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> "Int8Weight":
        scales = weight.float().abs().amax(dim=1).clamp(min=1e-12) / 127
        values = torch.round(weight.float() / scales[:, None]).clamp(-127, 127).to(torch.int8)
        kernel = linear_kernel() if weight.device.type == "cpu" and weight.dtype == torch.bfloat16 else None
        if kernel is not None:
            return cls(None, None, kernel.block_int8(values, scales, bias))
        return cls(values.contiguous(), scales.to(weight.dtype))

    @property
    def nbytes(self) -> int:
        if self.blocked is not None:
            return self.blocked.nbytes
        return self.values.numel() + self.scales.numel() * self.scales.element_size()


PACKABLE_DTYPES = (torch.float32, torch.bfloat16)


def can_prepack(weight: torch.Tensor) -> bool:
    """Whether oneDNN can hold this CPU weight in its own blocked layout (bench/linear_kernels.py:
    bf16 decode matmuls ~1.9x faster at 1 row, fp32 ~2.3x at 32 rows and up, same results in bf16)."""
    if weight.device.type != "cpu" or weight.dtype not in PACKABLE_DTYPES or not torch.backends.mkldnn.is_available():
        return False
    return weight.dtype != torch.bfloat16 or torch.ops.mkldnn._is_mkldnn_bf16_supported()  # (AVX-512 or AVX-NE)


def takes_int8(int8: Optional[Int8Weight], x: torch.Tensor) -> bool:
    return int8 is not None and x.shape[0] <= INT8_MAX_ROWS


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
           int8: Optional[Int8Weight], packed: Optional[torch.Tensor] = None,
           blocked: Optional[BlockedWeight] = None) -> torch.Tensor:
    """A small decode step reads the int8 copy where there is one (half the bytes of bf16: decode
    is memory-bound); otherwise the prepacked weight on CPU (blocked, or oneDNN's), the plain one
    elsewhere."""
    if takes_int8(int8, x):
        if int8.blocked is not None:
            return linear_kernel().int8(x, int8.blocked)  # (the bias is in the blocked copy)
        y = torch.ops.aten._weight_int8pack_mm(x.contiguous(), int8.values, int8.scales)
        return y if bias is None else y + bias
    if blocked is not None:
        return linear_kernel()(x, blocked)  # (the bias is in the blocked weight)
    if packed is not None:
        return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
    return F.linear(x, weight, bias)


class Projection(nn.Module):
    """One linear layer over the batch's tokens, computing one or several projections of the same
    input side by side (q/k/v and gate/up are fused: fewer, larger matmuls per step). Each part
    keeps its own LoraTarget, so adapters still see q_proj, k_proj, ... and add per-row deltas."""

    int8: Optional[Int8Weight] = None  # set by quantize_int8()
    # set by prepack_cpu_weights(), one of them: the weight (and bias) blocked for linear_cpu.c, or in oneDNN's layout
    blocked: Optional[BlockedWeight] = None
    packed: Optional[torch.Tensor] = None

    def __init__(self, in_features: int, parts: dict[str, int], bias: bool) -> None:
        super().__init__()
        self.names, self.sizes = tuple(parts), tuple(parts.values())
        self.weight = nn.Parameter(torch.empty(sum(self.sizes), in_features))
        self.bias = nn.Parameter(torch.empty(sum(self.sizes))) if bias else None
        self.targets = nn.ModuleDict({n: LoraTarget(in_features, size) for n, size in parts.items()})
        self.target_list = tuple(self.targets.values())  # (the same modules, read every step)

    def forward(self, x: torch.Tensor, batch: Any = None) -> torch.Tensor:
        """Returns the parts side by side: [tokens, sum(sizes)]."""
        lora = batch.lora if batch is not None else None
        if lora is None:
            return linear(x, self.weight, self.bias, self.int8, self.packed, self.blocked)
        parts = [t.lora for t in self.target_list]
        blocked = self.int8.blocked if takes_int8(self.int8, x) else self.blocked
        y = lora.project(x, blocked, parts) if blocked is not None else None  # the deltas inside linear_cpu.c's pass
        if y is None:
            y = linear(x, self.weight, self.bias, self.int8, self.packed, self.blocked)
            lora.add_parts(y, x, parts, self.sizes)  # every part's delta, in one go where the plan can
        return y

    def prepack(self, keep_weight: bool) -> int:
        """Compute with a prepacked copy of the weight from now on: blocked for linear_cpu.c where it
        runs (bf16 with AVX512-BF16: 1.1-1.3x faster than oneDNN's at 1-64 rows), else oneDNN's. The
        float weight becomes an empty placeholder unless something else shares it (a tied LM head is
        the embedding, so its packed copy costs the embedding's size again: 56 MB for the default
        model, for a GEMV ~2.5x faster). Returns the bytes added. A oneDNN-packed model can't be
        deep-copied or pickled (its packed tensors have no storage torch can copy); nothing in the
        server does either."""
        kernel = linear_kernel() if self.weight.dtype == torch.bfloat16 else None
        if kernel is not None:
            self.blocked = kernel.block(self.weight, self.bias)
        else:
            self.packed = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach(), None)
        if keep_weight:
            return self.weight.numel() * self.weight.element_size()
        self.weight = nn.Parameter(self.weight.new_empty(0, self.weight.shape[1]), requires_grad=False)
        return 0


class RMSNorm(nn.Module):
    """w * x / rms(x) over the last dimension."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # one op: ATen normalises and scales in fp32 and rounds once
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)

    fusable = True  # the fused kernels compute this norm (w * x / rms(x), rounded once)

    def add_norm(self, x: torch.Tensor, delta: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(x + delta, its norm); delta None: (x, its norm). One pass of a fused kernel where there is
        one (norm_cpu.c on bf16 CPU rows, Triton on CUDA), which adds into x in place."""
        kernels = fused_kernels(x) if self.fusable else None
        if kernels is not None and kernels.takes(x) and (delta is None or kernels.takes(delta)):
            return x, kernels.add_rms_norm(x, delta, self.weight, self.eps)
        x = x if delta is None else x + delta
        return x, self(x)


class OnePlusRMSNorm(RMSNorm):
    """Gemma's (1 + w) * x / rms(x), all in fp32 and cast back once, as transformers computes it
    (its checkpoints store w around 0)."""

    fusable = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x.float(), (x.shape[-1],), 1.0 + self.weight.float(), self.eps).to(x.dtype)


def make_norm(kind: Norm, dim: int, eps: float) -> RMSNorm:
    return OnePlusRMSNorm(dim, eps) if kind is Norm.RMS_ONE_PLUS else RMSNorm(dim, eps)


def quantize_int8(model: nn.Module) -> int:
    """Give every projection and the LM head a weight-only int8 copy for small decode steps (the
    float weights stay for prefills and large batches). Returns the bytes added."""
    added = 0
    for module in model.modules():
        if isinstance(module, Projection):
            module.int8 = Int8Weight.of(module.weight.detach(), module.bias)
            added += module.int8.nbytes
    return added


def prepack_cpu_weights(model: nn.Module) -> int:
    """Give every CPU projection a oneDNN-packed weight (done last: int8 copies are made from the
    float weights). Returns the bytes added: only shared weights are kept beside their packed copy."""
    projections = [m for m in model.modules() if isinstance(m, Projection) and can_prepack(m.weight)]
    shared = {id(p) for m in model.modules() if not isinstance(m, Projection) for p in m.parameters(recurse=False)}
    return sum(m.prepack(keep_weight=id(m.weight) in shared) for m in projections)
