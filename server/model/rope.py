"""Rotary position embeddings, one object per RoPE variant, computed the way transformers does.

Inverse frequencies come from transformers' own RoPE functions (default, linear, llama3, yarn,
longrope, dynamic NTK), so every published scaling means exactly what it means there. Angles are
fp32 position * fp32 inverse frequency, cos/sin scaled by the variant's attention factor, then cast
to the model dtype, as transformers computes them. Two variants depend on the sequence's length:
longrope switches to its long factors once a sequence passes the original context, and dynamic NTK
re-derives its base from the length. Like transformers' single-sequence generate, the switch is
made per sequence per step: tokens already cached keep the rotation they were written with.
"""

from __future__ import annotations

from typing import Optional

import torch

from server.model.arch import ArchConfig


class Rotary:
    """Static tables (default, linear, llama3, yarn): the angle depends on the position alone."""

    needs_seq_lens = False
    graph_safe = True  # computed on the device from device tensors: fine inside a CUDA graph

    def __init__(self, inv_freq: torch.Tensor, attention_scaling: float) -> None:
        self.inv_freq = inv_freq  # [rotary_dim / 2] float32
        self.attention_scaling = attention_scaling

    def cos_sin(self, positions: torch.Tensor, seq_lens: Optional[torch.Tensor],
                dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions, seq_lens: [tokens]. Returns cos, sin: [tokens, 1, rotary_dim] in `dtype`."""
        return self._tables(positions[:, None].float() * self._inv_freq_for(seq_lens), dtype)

    def _inv_freq_for(self, seq_lens: Optional[torch.Tensor]) -> torch.Tensor:
        return self.inv_freq[None, :]

    def _tables(self, freqs: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos() * self.attention_scaling, emb.sin() * self.attention_scaling
        return cos.to(dtype).unsqueeze(1), sin.to(dtype).unsqueeze(1)

    def to(self, device: torch.device) -> "Rotary":
        self.inv_freq = self.inv_freq.to(device)
        return self


class LongRope(Rotary):
    """Phi-3.5 / Phi-4-mini: short factors up to the original context, long factors past it."""

    needs_seq_lens = True

    def __init__(self, short: torch.Tensor, long: torch.Tensor, switch_len: int, attention_scaling: float) -> None:
        super().__init__(short, attention_scaling)
        self.long_inv_freq, self.switch_len = long, switch_len

    def _inv_freq_for(self, seq_lens: Optional[torch.Tensor]) -> torch.Tensor:
        return torch.where(seq_lens[:, None] > self.switch_len, self.long_inv_freq[None, :], self.inv_freq[None, :])

    def to(self, device: torch.device) -> "LongRope":
        self.long_inv_freq = self.long_inv_freq.to(device)
        return super().to(device)


class DynamicNtkRope(Rotary):
    """Dynamic NTK scaling: past `max_position_embeddings` the base grows with the sequence's
    length. Needs the lengths on the host, so steps using it are never CUDA-graphed."""

    needs_seq_lens = True
    graph_safe = False

    def __init__(self, arch: ArchConfig, key: str, inv_freq: torch.Tensor) -> None:
        super().__init__(inv_freq, 1.0)
        self.arch, self.key = arch, key
        self._by_length: dict[int, torch.Tensor] = {}

    def _inv_freq_for(self, seq_lens: Optional[torch.Tensor]) -> torch.Tensor:
        lengths = seq_lens.tolist()
        rows = [self._at(n) for n in lengths]
        return torch.stack(rows) if rows else self.inv_freq[None, :]

    def _at(self, length: int) -> torch.Tensor:
        if length <= self.arch.max_position_embeddings:
            return self.inv_freq
        if length not in self._by_length:
            if len(self._by_length) > 4096:
                self._by_length.clear()
            # a tensor length, as transformers passes it: its base is then computed in fp32, bit for bit
            inv_freq, _ = _init_fn("dynamic")(self.arch.hf, None, seq_len=torch.tensor(length),
                                              **_layer_kw(self.arch, self.key))
            self._by_length[length] = inv_freq.to(self.inv_freq.device)
        return self._by_length[length]


def build_rotaries(arch: ArchConfig, device: torch.device) -> dict[str, Rotary]:
    """One Rotary per distinct RoPE configuration the layers use (Gemma 3 has two)."""
    return {key: _build(arch, key).to(device) for key in dict.fromkeys(arch.layer_ropes)}


def _build(arch: ArchConfig, key: str) -> Rotary:
    params = arch.rope_parameters(key)
    rope_type = params.get("rope_type", "default")
    if rope_type == "default":
        dim = arch.rope_dim
        inv_freq = 1.0 / (params["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
        return Rotary(inv_freq, 1.0)
    inv_freq, scaling = _init_fn(rope_type)(arch.hf, None, **_layer_kw(arch, key))
    if rope_type == "longrope":
        switch = params["original_max_position_embeddings"]
        long, _ = _init_fn(rope_type)(arch.hf, None, seq_len=switch + 1, **_layer_kw(arch, key))
        return LongRope(inv_freq, long, switch, scaling)
    if rope_type == "dynamic":
        return DynamicNtkRope(arch, key, inv_freq)
    return Rotary(inv_freq, scaling)


def _init_fn(rope_type: str):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    return ROPE_INIT_FUNCTIONS[rope_type]


def _layer_kw(arch: ArchConfig, key: str) -> dict[str, str]:
    return {} if key == "default" else {"layer_type": key}


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [tokens, heads, head_dim]; cos/sin: [tokens, 1, rotary_dim]. Rotates the first
    rotary_dim dims of each head (all of them but on Phi-4-mini) and passes the rest through."""
    dim = cos.shape[-1]
    if dim == x.shape[-1]:
        return x * cos + _rotate_half(x) * sin
    rot, rest = x[..., :dim], x[..., dim:]
    return torch.cat([rot * cos + _rotate_half(rot) * sin, rest], dim=-1)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)
