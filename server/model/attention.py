"""Self-attention over the KV cache, for ragged batches: per sequence for prefills, batched for
decode steps. Masks (causal, sliding window, the decode rows' lengths) are built once per forward
pass for each window size the layers use, not once per layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from math import inf
from typing import Any, Optional, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from server.kernels.fused_triton import HeadNorms
from server.model.arch import ArchConfig
from server.model.layers import LoraTarget, Projection, RMSNorm, make_norm
from server.model.rope import rotate

Window = Optional[int]  # sliding-window size in keys (the query's own included), None: the whole context


class KVStore(Protocol):
    """What attention needs from the KV cache, whatever its layout (server.engine.kv_cache)."""

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, batch: Any) -> None: ...

    def decode_kv(self, layer: int, batch: Any) -> tuple[torch.Tensor, torch.Tensor]: ...

    def decode_attention(self, layer: int, q: torch.Tensor, batch: Any, window: Window,
                         scale: float) -> Optional[torch.Tensor]: ...

    def prefill_kv(self, layer: int, batch: Any, seq: int) -> tuple[torch.Tensor, torch.Tensor]: ...

    def rotate_and_write(self, layer: int, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int,
                         batch: Any, norms: Optional[HeadNorms]) -> Optional[torch.Tensor]: ...


@dataclass
class StepTensors:
    """What every layer of one forward pass shares, computed once per pass instead of per layer."""

    batch: Any  # the ForwardBatch
    kv: KVStore
    rope: dict[str, tuple[torch.Tensor, torch.Tensor]]  # RoPE key -> cos, sin [tokens, 1, rotary_dim]
    decode_masks: dict[Window, torch.Tensor] = field(default_factory=dict)  # [seqs, 1, 1, attend_len] 0/-inf
    prefill_masks: list[dict[Window, Optional[torch.Tensor]]] = field(default_factory=list)  # per sequence


def decode_masks(kv_lens: torch.Tensor, attend_len: int, windows: set[Window],
                 dtype: torch.dtype) -> dict[Window, torch.Tensor]:
    """Additive masks, in the model dtype (attention would otherwise convert a bool mask every
    layer). Each row's query sits at position kv_len - 1; a window W lets it see the last W keys."""
    positions = torch.arange(attend_len, device=kv_lens.device)[None, :]
    masks = {}
    for window in windows:
        hidden = positions >= kv_lens[:, None]
        if window is not None:
            hidden = hidden | (positions < kv_lens[:, None] - window)
        masks[window] = torch.zeros(hidden.shape, dtype=dtype, device=hidden.device).masked_fill(
            hidden, -inf)[:, None, None, :]
    return masks


def prefill_masks(query_len: int, total: int, windows: set[Window],
                  device: torch.device) -> dict[Window, Optional[torch.Tensor]]:
    """Boolean [query_len, total] masks (True: may attend) for one sequence's new tokens, which sit
    at positions total - query_len ... total - 1; None where plain causal attention is exact."""
    past = total - query_len
    q_pos = torch.arange(query_len, device=device)[:, None] + past
    k_pos = torch.arange(total, device=device)[None, :]
    masks: dict[Window, Optional[torch.Tensor]] = {}
    for window in windows:
        if past == 0 and (window is None or total <= window):
            masks[window] = None
        else:
            allowed = k_pos <= q_pos
            masks[window] = allowed if window is None else allowed & (k_pos > q_pos - window)
    return masks


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor], scale: float,
           softcap: Optional[float]) -> torch.Tensor:
    """q: [b, heads, n, dim]; k, v: [b, kv_heads, total, dim]; mask: None (causal), bool (True:
    attend) or additive. Soft-capped scores need the explicit form, in transformers' order: scale,
    cap, mask, fp32 softmax."""
    if softcap is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=scale,
                                              enable_gqa=q.shape[1] != k.shape[1])
    if q.shape[1] != k.shape[1]:
        groups = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = torch.tanh((q @ k.transpose(-1, -2)) * scale / softcap) * softcap  # [b, heads, n, total]
    if mask is None:
        mask = torch.ones(scores.shape[-2:], dtype=torch.bool, device=q.device).tril(scores.shape[-1] - q.shape[2])
    scores = scores.masked_fill(~mask, -inf) if mask.dtype == torch.bool else scores + mask
    return torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype) @ v


class Attention(nn.Module):
    def __init__(self, cfg: ArchConfig, layer_index: int) -> None:
        super().__init__()
        self.layer_index = layer_index
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.scale, self.softcap = cfg.scale, cfg.attn_softcap
        self.window: Window = cfg.layer_windows[layer_index]
        self.rope_key = cfg.layer_ropes[layer_index]
        q_size, kv_size = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        parts = {"q_proj": q_size, "k_proj": kv_size, "v_proj": kv_size}
        self.qkv_proj = Projection(cfg.hidden_size, parts, bias=cfg.qkv_bias)
        self.o_proj = Projection(q_size, {"o_proj": cfg.hidden_size}, bias=cfg.o_bias)
        self.q_norm: Optional[RMSNorm] = None  # per-head norms of q and k, before RoPE (Qwen3, Gemma 3)
        self.k_norm: Optional[RMSNorm] = None
        if cfg.qk_norm:
            self.q_norm = make_norm(cfg.norm, cfg.head_dim, cfg.rms_norm_eps)
            self.k_norm = make_norm(cfg.norm, cfg.head_dim, cfg.rms_norm_eps)

    def lora_targets(self) -> dict[str, LoraTarget]:
        return {**self.qkv_proj.targets, **self.o_proj.targets}

    def forward(self, x: torch.Tensor, step: StepTensors) -> torch.Tensor:
        q = self._q_with_kv_stored(x, step)
        rows = step.batch.num_decode_rows  # decoding rows come first, one token each: batched
        if step.batch.is_decode:
            out = self._decode(q, step)
        elif rows:
            out = torch.cat([self._decode(q[:rows], step), self._prefill(q[rows:], step, first=rows)])
        else:
            out = self._prefill(q, step)
        return self.o_proj(out.reshape(x.shape[0], -1), step.batch)

    def _q_with_kv_stored(self, x: torch.Tensor, step: StepTensors) -> torch.Tensor:
        """q [tokens, heads, head_dim], normed (where the family does) and rotated; the tokens' k
        (likewise) and v written to the cache."""
        qkv = self.qkv_proj(x, step.batch)
        cos, sin = step.rope[self.rope_key]
        if cos.shape[-1] == self.head_dim and (self.q_norm is None or self.q_norm.fusable):
            norms = None if self.q_norm is None else (self.q_norm.weight, self.k_norm.weight, self.q_norm.eps)
            q = step.kv.rotate_and_write(self.layer_index, qkv, cos, sin, self.num_heads, step.batch, norms)
            if q is not None:  # (the store did norms, RoPE and its writes in one pass)
                return q
        q, k, v = self._qkv(qkv, cos, sin)
        step.kv.write(self.layer_index, k, v, step.batch)
        return q

    def _qkv(self, qkv: torch.Tensor, cos: torch.Tensor,
             sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """[tokens, heads or kv_heads, head_dim] each, q and k normed (where the family does) and rotated."""
        heads, kv_heads = self.num_heads, self.num_kv_heads
        qkv = qkv.view(qkv.shape[0], heads + 2 * kv_heads, self.head_dim)
        v = qkv[:, heads + kv_heads :]
        if self.q_norm is None:  # q and k rotated in one pass
            qk = rotate(qkv[:, : heads + kv_heads], cos, sin)
            return qk[:, :heads], qk[:, heads:], v
        q, k = self.q_norm(qkv[:, :heads]), self.k_norm(qkv[:, heads : heads + kv_heads])
        return rotate(q, cos, sin), rotate(k, cos, sin), v

    def _decode(self, q: torch.Tensor, step: StepTensors) -> torch.Tensor:
        """q: [seqs, heads, dim], one new token per sequence at position context_len - 1."""
        if self.softcap is None:  # a store that attends in place (the paged cache's CPU kernel)
            fused = step.kv.decode_attention(self.layer_index, q, step.batch, self.window, self.scale)
            if fused is not None:
                return fused
        # The query heads sharing a KV head become that head's query rows: attention reads each KV
        # head once, instead of a copy expanded to every query head (what enable_gqa does on the
        # kernels that take a mask), and all rows sit at one position, so the mask covers causality.
        keys, values = step.kv.decode_kv(self.layer_index, step.batch)  # [seqs, kv_heads, attend_len, dim]
        seqs = q.shape[0]
        grouped = q.view(seqs, self.num_kv_heads, self.num_heads // self.num_kv_heads, self.head_dim)
        out = attend(grouped, keys, values, step.decode_masks[self.window], self.scale, self.softcap)
        return out.reshape(seqs, self.num_heads, self.head_dim)  # [seqs, heads, dim]

    def _prefill(self, q: torch.Tensor, step: StepTensors, first: int = 0) -> torch.Tensor:
        """q: the new tokens of sequences first, first + 1, ... (those still prefilling)."""
        outputs, start = [], 0
        for i, n_new in enumerate(step.batch.query_lens[first:], start=first):
            qi = q[start : start + n_new].transpose(0, 1).unsqueeze(0)  # [1, heads, n_new, dim]
            ki, vi = step.kv.prefill_kv(self.layer_index, step.batch, i)  # [1, kv_heads, context, dim]
            o = attend(qi, ki, vi, step.prefill_masks[i][self.window], self.scale, self.softcap)
            outputs.append(o.squeeze(0).transpose(0, 1))
            start += n_new
        return torch.cat(outputs, dim=0)  # [tokens, heads, dim]
