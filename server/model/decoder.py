"""One decoder for every supported family (Llama, Mistral, Qwen2/3, Gemma 2/3, Phi-3), written for
ragged continuous batches.

A forward pass takes a ForwardBatch: the new tokens of every sequence flattened into one row,
and the KV-cache slot of each sequence. Linear layers run once over all tokens (q/k/v and gate/up
fused into one matmul each); attention runs per sequence for prefills and batched for decode steps.
The families differ in a few named ways, fixed at construction from the ArchConfig: the norm,
Gemma's sandwich norms and embedding scale, q/k norms, the RoPE variant per layer, sliding windows
and soft-caps (see docs/models.md).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from server.kernels.elementwise import fused_kernels
from server.model.arch import ArchConfig
from server.model.attention import Attention, KVStore, StepTensors, Window, decode_masks, prefill_masks
from server.model.checkpoint import load_weights
from server.model.fused_decode import FusedDecode
from server.model.layers import LoraTarget, Projection, RMSNorm, make_norm
from server.model.rope import LongRope, Rotary, build_rotaries

_ACTIVATIONS = {"silu": F.silu, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh")}


@dataclass
class ForwardBatch:
    """Flattened new tokens of every sequence in a step, and where each sequence lives in the cache."""

    input_ids: torch.Tensor  # [tokens] long
    positions: torch.Tensor  # [tokens] long
    slots: torch.Tensor  # [seqs] long, KV-cache slot of each sequence
    query_lens: list[int]  # new tokens per sequence (all 1 in a decode step)
    context_lens: list[int]  # tokens in the cache per sequence after this step
    is_decode: bool
    lora: Any = None  # per-row adapter plan, consumed by LoRA-wrapped projections
    logit_rows: Optional[torch.Tensor] = None  # [rows] tokens to return logits for; default: each last
    dense_slots: bool = False  # decode: slots are exactly 0..seqs-1, so attention reads a cache view
    # Decode only, so a step needs no host data inside the model (what CUDA-graph capture requires):
    kv_lens: Optional[torch.Tensor] = None  # [seqs] long, context_lens on the device
    attend_len: int = 0  # cache positions attention reads: >= max(context_lens); fixed when graphed
    kv_index: Any = None  # where the tokens live in a paged cache (the cache's own PagedIndex)
    num_decode_rows: int = 0  # leading sequences feeding one token past their prefill (all of them in decode)

    def __post_init__(self) -> None:
        if self.is_decode:
            self.num_decode_rows = len(self.query_lens)

    @property
    def last_token_rows(self) -> torch.Tensor:  # [seqs] index of each sequence's last token
        ends = torch.tensor(self.query_lens, device=self.input_ids.device).cumsum(0)
        return ends - 1

    def token_seq_lens(self) -> torch.Tensor:
        """[tokens] the length of each token's sequence after this step (longrope, dynamic NTK)."""
        if self.is_decode:
            return self.kv_lens
        lens = torch.tensor(self.context_lens, device=self.input_ids.device)  # a mixed batch's decode rows too
        return lens.repeat_interleave(torch.tensor(self.query_lens, device=self.input_ids.device))


class MLP(nn.Module):
    def __init__(self, cfg: ArchConfig) -> None:
        super().__init__()
        self.intermediate_size = cfg.intermediate_size
        self.act = _ACTIVATIONS[cfg.activation]
        parts = {"gate_proj": cfg.intermediate_size, "up_proj": cfg.intermediate_size}
        self.gate_up_proj = Projection(cfg.hidden_size, parts, bias=cfg.mlp_bias)
        self.down_proj = Projection(cfg.intermediate_size, {"down_proj": cfg.hidden_size}, bias=cfg.mlp_bias)

    def lora_targets(self) -> dict[str, LoraTarget]:
        return {**self.gate_up_proj.targets, **self.down_proj.targets}

    def forward(self, x: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        gate_up = self.gate_up_proj(x, batch)
        kernels = fused_kernels(gate_up) if self.act is F.silu else None
        if kernels is not None and kernels.takes(gate_up):  # silu(gate) * up in one pass
            return self.down_proj(kernels.silu_mul(gate_up), batch)
        gate, up = gate_up.split(self.intermediate_size, dim=-1)
        return self.down_proj(self.act(gate) * up, batch)


class Residual:
    """The residual stream through the layers. A block's output is held until the next norm reads
    the stream, so the add and the norm are one pass (norm_cpu.c on bf16 CPU rows)."""

    def __init__(self, x: torch.Tensor) -> None:
        self.x, self.pending = x, None

    def add(self, delta: torch.Tensor) -> None:
        if self.pending is not None:
            self.x = self.x + self.pending
        self.pending = delta

    def normed(self, norm: RMSNorm) -> torch.Tensor:
        """norm(x + the pending output), the sum kept as the stream."""
        self.x, out = norm.add_norm(self.x, self.pending)
        self.pending = None
        return out

    def value(self) -> torch.Tensor:
        return self.x if self.pending is None else self.x + self.pending


class DecoderLayer(nn.Module):
    """Llama's pre-norm layer: x += attn(norm(x)); x += mlp(norm(x))."""

    def __init__(self, cfg: ArchConfig, index: int) -> None:
        super().__init__()
        self.input_layernorm = make_norm(cfg.norm, cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, index)
        self.post_attention_layernorm = make_norm(cfg.norm, cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, stream: Residual, step: StepTensors) -> None:
        stream.add(self.self_attn(stream.normed(self.input_layernorm), step))
        stream.add(self.mlp(stream.normed(self.post_attention_layernorm), step.batch))


class SandwichDecoderLayer(DecoderLayer):
    """Gemma's layer: each block's output is normed before it joins the residual stream, so
    `post_attention_layernorm` norms the attention output and the MLP gets norms of its own."""

    def __init__(self, cfg: ArchConfig, index: int) -> None:
        super().__init__(cfg, index)
        self.pre_feedforward_layernorm = make_norm(cfg.norm, cfg.hidden_size, cfg.rms_norm_eps)
        self.post_feedforward_layernorm = make_norm(cfg.norm, cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, stream: Residual, step: StepTensors) -> None:
        stream.add(self.post_attention_layernorm(self.self_attn(stream.normed(self.input_layernorm), step)))
        stream.add(self.post_feedforward_layernorm(self.mlp(stream.normed(self.pre_feedforward_layernorm),
                                                            step.batch)))


class Backbone(nn.Module):
    def __init__(self, cfg: ArchConfig) -> None:
        super().__init__()
        self.embed_scale = cfg.embed_scale
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        layer = SandwichDecoderLayer if cfg.sandwich_norms else DecoderLayer
        self.layers = nn.ModuleList(layer(cfg, i) for i in range(cfg.num_layers))
        self.norm = make_norm(cfg.norm, cfg.hidden_size, cfg.rms_norm_eps)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = self.embed_tokens(input_ids)  # [tokens, hidden]
        if self.embed_scale is not None:  # Gemma: the scale rounded to the model dtype, as transformers does
            h = h * torch.tensor(self.embed_scale, dtype=h.dtype)
        return h


class CausalLM(nn.Module):
    """Decoder + LM head. forward() returns logits for each sequence's last new token (or the
    batch's `logit_rows`)."""

    def __init__(self, cfg: ArchConfig) -> None:
        super().__init__()
        self.config = cfg
        self.model = Backbone(cfg)
        self.lm_head = Projection(cfg.hidden_size, {"lm_head": cfg.vocab_size}, bias=False)  # never adapted
        self.windows: set[Window] = set(cfg.layer_windows)
        self.rotaries: dict[str, Rotary] = {}  # made on the device by from_pretrained / init_rotaries
        self._recompute_lengths: frozenset[int] = frozenset()
        self.fused_decode: Optional[FusedDecode] = None  # CPU bf16: decode steps' layers in one C call (the loader's)

    def init_rotaries(self, device: torch.device) -> None:
        self.rotaries = build_rotaries(self.config, device)
        self._recompute_lengths = frozenset(r.switch_len + 1 for r in self.rotaries.values() if isinstance(r, LongRope))

    def recomputes_at(self, context_len: int) -> bool:
        """Whether a sequence reaching this length has its whole KV cache recomputed, as
        transformers does for Phi-3 longrope when a sequence first passes the original context."""
        return context_len in self._recompute_lengths

    @property
    def recomputes_caches(self) -> bool:
        return bool(self._recompute_lengths)

    @property
    def graph_safe(self) -> bool:
        """Whether a decode step reads no host data (CUDA graphs can replay it)."""
        return all(r.graph_safe for r in self.rotaries.values())

    def forward(self, batch: ForwardBatch, kv: KVStore) -> torch.Tensor:
        h = self.model.embed(batch.input_ids)  # [tokens, hidden]
        if batch.lora is not None:
            batch.lora.begin_pass()
        step = self.step_tensors(batch, kv, h.dtype)
        fused = self.fused_decode.run(batch, kv, step, h) if self.fused_decode is not None else None
        h = fused if fused is not None else self.layer_loop(h, step)
        if batch.logit_rows is not None:
            h = h[batch.logit_rows]
        elif not batch.is_decode:  # a decode step's rows are already each sequence's last token
            h = h[batch.last_token_rows]
        logits = self.lm_head(self.model.norm(h))  # [rows, vocab]
        if self.config.final_softcap is not None:
            logits = torch.tanh(logits / self.config.final_softcap) * self.config.final_softcap
        return logits.float()

    def layer_loop(self, h: torch.Tensor, step: StepTensors) -> torch.Tensor:
        """The residual stream after every layer, layer by layer in Python."""
        stream = Residual(h)
        for layer in self.model.layers:
            layer(stream, step)
        return stream.value()

    def lora_targets(self) -> dict[tuple[int, str], LoraTarget]:
        """(layer index, projection name) -> where that projection's LoRA hangs."""
        return {(i, name): target for i, layer in enumerate(self.model.layers)
                for part in (layer.self_attn, layer.mlp) for name, target in part.lora_targets().items()}

    def fused_projections(self) -> list[tuple[int, Projection]]:
        """(layer index, projection) for q/k/v, o, gate/up and down of every layer, in the order a
        forward pass computes them."""
        return [(i, projection) for i, layer in enumerate(self.model.layers)
                for projection in (layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj,
                                   layer.mlp.down_proj)]

    def lora_groups(self) -> list[tuple[tuple[int, str], ...]]:
        """The keys of lora_targets() by fused projection: (q, k, v), (o,), (gate, up), (down,) per layer."""
        return [tuple((i, name) for name in projection.names) for i, projection in self.fused_projections()]

    def step_tensors(self, batch: ForwardBatch, kv: KVStore, dtype: torch.dtype) -> StepTensors:
        seq_lens = batch.token_seq_lens() if any(r.needs_seq_lens for r in self.rotaries.values()) else None
        rope = {key: r.cos_sin(batch.positions, seq_lens, dtype) for key, r in self.rotaries.items()}
        step = StepTensors(batch, kv, rope)
        if batch.num_decode_rows:
            step.decode_masks = decode_masks(batch.kv_lens, batch.attend_len, self.windows, dtype)
        if not batch.is_decode:  # the prefilling sequences: those after the decoding rows
            first = batch.num_decode_rows
            step.prefill_masks = [{}] * first + [
                prefill_masks(n, total, self.windows, batch.input_ids.device)
                for n, total in zip(batch.query_lens[first:], batch.context_lens[first:])]
        return step

    @classmethod
    def from_pretrained(cls, model_dir: Path, device: torch.device, dtype: torch.dtype) -> "CausalLM":
        cfg = ArchConfig.from_hf(json.loads((model_dir / "config.json").read_text()))
        with torch.device("meta"):
            model = cls(cfg)
        load_weights(model, model_dir, device, dtype)
        model.init_rotaries(device)
        return model.eval()


def prefer_planless_attention() -> None:
    """Keep scaled_dot_product_attention off cuDNN on CUDA: cuDNN builds an execution plan for
    every new KV length, i.e. every decode step (1.5 ms of host time per call, measured on an
    H100); the flash and memory-efficient kernels need no plan."""
    torch.backends.cuda.enable_cudnn_sdp(False)
