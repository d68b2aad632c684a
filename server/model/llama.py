"""A Llama-family decoder (Llama, Mistral, Qwen2, SmolLM) written for ragged continuous batches.

One forward pass takes a ForwardBatch: the new tokens of every sequence flattened into one row,
and the KV-cache slot of each sequence. Linear layers run once over all tokens (q/k/v and gate/up
fused into one matmul each); attention runs batched for decode steps and per sequence for
prefills. Weights load from HF safetensors names and are fused at load.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from math import inf
from pathlib import Path
from typing import Any, Optional, Protocol

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")


@dataclass(frozen=True)
class ArchConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> "ArchConfig":
        model_type = cfg.get("model_type", "")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"unsupported model_type {model_type!r}; supported: {SUPPORTED_MODEL_TYPES}")
        rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
        if rope.get("rope_type", "default") not in ("default", None):
            raise ValueError(f"unsupported rope_type {rope.get('rope_type')!r}")
        heads = cfg["num_attention_heads"]
        return cls(
            model_type=model_type,
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads", heads),
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=rope.get("rope_theta", cfg.get("rope_theta", 10000.0)),
            max_position_embeddings=cfg.get("max_position_embeddings", 4096),
            tie_word_embeddings=cfg.get("tie_word_embeddings", False),
            attention_bias=cfg.get("attention_bias", model_type == "qwen2"),
        )

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes of K and V per token across all layers, at 4 bytes per element (fp32)."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * 4


class KVStore(Protocol):
    """What attention needs from the KV cache (implemented by server.engine.kv_cache.KVCache)."""

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]: ...


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

    @property
    def last_token_rows(self) -> torch.Tensor:  # [seqs] index of each sequence's last token
        ends = torch.tensor(self.query_lens, device=self.input_ids.device).cumsum(0)
        return ends - 1


@dataclass
class StepTensors:
    """What every layer of one forward pass shares, computed once per pass instead of per layer."""

    batch: ForwardBatch
    kv: KVStore
    cos: torch.Tensor  # [tokens, 1, head_dim]
    sin: torch.Tensor  # [tokens, 1, head_dim]
    decode_mask: Optional[torch.Tensor] = None  # [seqs, 1, 1, attend_len] 0 / -inf, decode steps only


class LoraTarget(nn.Module):
    """Where the adapter tier hangs one projection's packed LoRA (`lora`, a PackedLora or None).

    The model never imports the adapter code; it only calls `lora(x, batch.lora)` for a delta.
    """

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.lora: Any = None

    def add_delta(self, y: torch.Tensor, x: torch.Tensor, batch: ForwardBatch) -> None:
        """y += this projection's LoRA delta for the batch's rows (y may be a column slice)."""
        if self.lora is not None and batch.lora is not None:
            y += self.lora(x, batch.lora)


INT8_MAX_ROWS = 4  # int8 matmuls beat float ones up to this many rows on CPU (bench/step_time.py)


@dataclass(frozen=True)
class Int8Weight:
    """Weight-only int8 copy of a float weight, one scale per output row (symmetric)."""

    values: torch.Tensor  # [out, in] int8
    scales: torch.Tensor  # [out] in the model dtype

    @classmethod
    def of(cls, weight: torch.Tensor) -> "Int8Weight":
        scales = weight.float().abs().amax(dim=1).clamp(min=1e-12) / 127
        values = torch.round(weight.float() / scales[:, None]).clamp(-127, 127).to(torch.int8)
        return cls(values.contiguous(), scales.to(weight.dtype))


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
           int8: Optional[Int8Weight]) -> torch.Tensor:
    """A small decode step reads the int8 copy (half the bytes of bf16: decode is memory-bound);
    prefills and large batches use the float weight, where the int8 kernel is slower."""
    if int8 is None or x.shape[0] > INT8_MAX_ROWS:
        return F.linear(x, weight, bias)
    y = torch.ops.aten._weight_int8pack_mm(x.contiguous(), int8.values, int8.scales)
    return y if bias is None else y + bias


class Projection(nn.Module):
    """One linear layer over the batch's tokens, computing one or several projections of the same
    input side by side (q/k/v and gate/up are fused: fewer, larger matmuls per step). Each part
    keeps its own LoraTarget, so adapters still see q_proj, k_proj, ... and add per-row deltas."""

    int8: Optional[Int8Weight] = None  # set by quantize_int8()

    def __init__(self, in_features: int, parts: dict[str, int], bias: bool) -> None:
        super().__init__()
        self.names, self.sizes = tuple(parts), tuple(parts.values())
        self.weight = nn.Parameter(torch.empty(sum(self.sizes), in_features))
        self.bias = nn.Parameter(torch.empty(sum(self.sizes))) if bias else None
        self.targets = nn.ModuleDict({n: LoraTarget(in_features, size) for n, size in parts.items()})

    def forward(self, x: torch.Tensor, batch: Optional[ForwardBatch] = None) -> torch.Tensor:
        """Returns the parts side by side: [tokens, sum(sizes)]."""
        y = linear(x, self.weight, self.bias, self.int8)
        if batch is not None and batch.lora is not None:
            start = 0
            for name, size in zip(self.names, self.sizes):
                self.targets[name].add_delta(y[:, start : start + size], x, batch)
                start += size
        return y


def fuse_checkpoint(state: dict[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    """Concatenate HF's separate q/k/v and gate/up weights into the fused projections' weights."""
    groups = {"self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
              "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj")}
    for i in range(num_layers):
        for fused, parts in groups.items():
            for kind in ("weight", "bias"):
                keys = [f"model.layers.{i}.{part}.{kind}" for part in parts]
                if all(k in state for k in keys):
                    state[f"model.layers.{i}.{fused}.{kind}"] = torch.cat([state.pop(k) for k in keys])
    return state


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # one op: ATen normalises in fp32 and scales in the input dtype, like the reference model
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


class Rotary(nn.Module):
    def __init__(self, head_dim: int, theta: float, max_positions: int) -> None:
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
        freqs = torch.outer(torch.arange(max_positions, dtype=torch.float64), inv_freq)
        emb = torch.cat([freqs, freqs], dim=-1)  # [positions, head_dim]
        self.register_buffer("cos", emb.cos().float(), persistent=False)
        self.register_buffer("sin", emb.sin().float(), persistent=False)

    def tables(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin for these positions: [tokens, 1, head_dim] each."""
        return self.cos[positions].unsqueeze(1).to(dtype), self.sin[positions].unsqueeze(1).to(dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [tokens, heads, head_dim] rotated by its positions' angles (cos/sin: [tokens, 1, head_dim])."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


class Attention(nn.Module):
    def __init__(self, cfg: ArchConfig, layer_index: int) -> None:
        super().__init__()
        self.layer_index = layer_index
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        q_size, kv_size = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        parts = {"q_proj": q_size, "k_proj": kv_size, "v_proj": kv_size}
        self.qkv_proj = Projection(cfg.hidden_size, parts, bias=cfg.attention_bias)
        self.o_proj = Projection(q_size, {"o_proj": cfg.hidden_size}, bias=False)

    def lora_targets(self) -> dict[str, LoraTarget]:
        return {**self.qkv_proj.targets, **self.o_proj.targets}

    def forward(self, x: torch.Tensor, step: StepTensors) -> torch.Tensor:
        tokens, heads, kv_heads = x.shape[0], self.num_heads, self.num_kv_heads
        qkv = self.qkv_proj(x, step.batch).view(tokens, heads + 2 * kv_heads, self.head_dim)
        qk = rotate(qkv[:, : heads + kv_heads], step.cos, step.sin)  # q and k rotated in one pass
        q, k, v = qk[:, :heads], qk[:, heads:], qkv[:, heads + kv_heads :]
        k_cache, v_cache = step.kv.layer(self.layer_index)  # [slots, kv_heads, capacity, head_dim]
        if step.batch.is_decode:
            out = self._decode(q, k, v, k_cache, v_cache, step)
        else:
            out = self._prefill(q, k, v, k_cache, v_cache, step.batch)
        return self.o_proj(out.reshape(tokens, -1), step.batch)

    def _decode(self, q, k, v, k_cache, v_cache, step: StepTensors) -> torch.Tensor:
        # q: [seqs, heads, dim]; one new token per sequence, written at position context_len - 1
        batch = step.batch
        k_cache[batch.slots, :, batch.positions] = k
        v_cache[batch.slots, :, batch.positions] = v
        length, seqs = batch.attend_len, batch.slots.shape[0]
        if batch.dense_slots:
            keys, values = k_cache[:seqs, :, :length], v_cache[:seqs, :, :length]  # views, no copy
        else:
            keys, values = k_cache[batch.slots, :, :length], v_cache[batch.slots, :, :length]
        # The query heads sharing a KV head become that head's query rows: attention reads each KV
        # head once, instead of a copy expanded to every query head (what enable_gqa does on the
        # kernels that take a mask), and all rows sit at one position, so no causal mask is needed.
        grouped = q.view(seqs, self.num_kv_heads, self.num_heads // self.num_kv_heads, self.head_dim)
        out = F.scaled_dot_product_attention(grouped, keys, values, attn_mask=step.decode_mask)
        return out.reshape(seqs, self.num_heads, self.head_dim)  # [seqs, heads, dim]

    def _prefill(self, q, k, v, k_cache, v_cache, batch: ForwardBatch) -> torch.Tensor:
        outputs, start = [], 0
        for slot, n_new, total in zip(batch.slots.tolist(), batch.query_lens, batch.context_lens):
            past = total - n_new
            k_cache[slot, :, past:total] = k[start : start + n_new].transpose(0, 1)
            v_cache[slot, :, past:total] = v[start : start + n_new].transpose(0, 1)
            qi = q[start : start + n_new].transpose(0, 1).unsqueeze(0)  # [1, heads, n_new, dim]
            ki, vi = k_cache[slot : slot + 1, :, :total], v_cache[slot : slot + 1, :, :total]
            if past == 0:
                o = F.scaled_dot_product_attention(qi, ki, vi, is_causal=True, enable_gqa=True)
            else:  # a prompt continued over an already-cached prefix
                allowed = torch.arange(total, device=q.device)[None, :] <= (
                    torch.arange(n_new, device=q.device)[:, None] + past
                )
                o = F.scaled_dot_product_attention(qi, ki, vi, attn_mask=allowed, enable_gqa=True)
            outputs.append(o.squeeze(0).transpose(0, 1))
            start += n_new
        return torch.cat(outputs, dim=0)  # [tokens, heads, dim]


class MLP(nn.Module):
    def __init__(self, cfg: ArchConfig) -> None:
        super().__init__()
        self.intermediate_size = cfg.intermediate_size
        parts = {"gate_proj": cfg.intermediate_size, "up_proj": cfg.intermediate_size}
        self.gate_up_proj = Projection(cfg.hidden_size, parts, bias=False)
        self.down_proj = Projection(cfg.intermediate_size, {"down_proj": cfg.hidden_size}, bias=False)

    def lora_targets(self) -> dict[str, LoraTarget]:
        return {**self.gate_up_proj.targets, **self.down_proj.targets}

    def forward(self, x: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        gate, up = self.gate_up_proj(x, batch).split(self.intermediate_size, dim=-1)
        return self.down_proj(F.silu(gate) * up, batch)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ArchConfig, index: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, index)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, step: StepTensors) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), step)
        return x + self.mlp(self.post_attention_layernorm(x), step.batch)


class Backbone(nn.Module):
    def __init__(self, cfg: ArchConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class CausalLM(nn.Module):
    """Decoder + LM head. forward() returns logits for each sequence's last new token (or the
    batch's `logit_rows`)."""

    def __init__(self, cfg: ArchConfig) -> None:
        super().__init__()
        self.config = cfg
        self.model = Backbone(cfg)
        self.lm_head = Projection(cfg.hidden_size, {"lm_head": cfg.vocab_size}, bias=False)  # never adapted
        self.rotary = Rotary(cfg.head_dim, cfg.rope_theta, cfg.max_position_embeddings)

    def forward(self, batch: ForwardBatch, kv: KVStore) -> torch.Tensor:
        h = self.model.embed_tokens(batch.input_ids)  # [tokens, hidden]
        step = self.step_tensors(batch, kv, h.dtype)
        for layer in self.model.layers:
            h = layer(h, step)
        if batch.logit_rows is not None:
            h = h[batch.logit_rows]
        elif not batch.is_decode:  # a decode step's rows are already each sequence's last token
            h = h[batch.last_token_rows]
        h = self.model.norm(h)  # [rows, hidden]
        return self.lm_head(h).float()  # [rows, vocab]

    def lora_targets(self) -> dict[tuple[int, str], LoraTarget]:
        """(layer index, projection name) -> where that projection's LoRA hangs."""
        return {(i, name): target for i, layer in enumerate(self.model.layers)
                for part in (layer.self_attn, layer.mlp) for name, target in part.lora_targets().items()}

    def step_tensors(self, batch: ForwardBatch, kv: KVStore, dtype: torch.dtype) -> StepTensors:
        cos, sin = self.rotary.tables(batch.positions, dtype)
        step = StepTensors(batch, kv, cos, sin)
        if batch.is_decode:
            positions = torch.arange(batch.attend_len, device=batch.kv_lens.device)
            beyond = (positions[None, :] >= batch.kv_lens[:, None])[:, None, None, :]
            # additive, in the model dtype: attention would otherwise convert a bool mask every layer
            step.decode_mask = torch.zeros(beyond.shape, dtype=dtype, device=beyond.device).masked_fill(beyond, -inf)
        return step

    @classmethod
    def from_pretrained(cls, model_dir: Path, device: torch.device, dtype: torch.dtype) -> "CausalLM":
        cfg = ArchConfig.from_hf(json.loads((model_dir / "config.json").read_text()))
        with torch.device("meta"):
            model = cls(cfg)
        state = _read_safetensors(model_dir)
        if cfg.tie_word_embeddings or "lm_head.weight" not in state:
            state["lm_head.weight"] = state["model.embed_tokens.weight"]
        state = fuse_checkpoint(state, cfg.num_layers)
        missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
        missing = [m for m in missing if not m.startswith("rotary.")]
        if missing:
            raise ValueError(f"checkpoint is missing weights: {missing[:5]}")
        model.rotary = Rotary(cfg.head_dim, cfg.rope_theta, cfg.max_position_embeddings)
        return model.to(device=device, dtype=dtype).eval()


def quantize_int8(model: CausalLM) -> int:
    """Give every projection and the LM head a weight-only int8 copy for small decode steps (the
    float weights stay for prefills and large batches). Returns the bytes added."""
    added = 0
    for module in model.modules():
        if isinstance(module, Projection):
            module.int8 = Int8Weight.of(module.weight.detach())
            added += module.int8.values.numel() + module.int8.scales.numel() * module.int8.scales.element_size()
    return added


def prefer_planless_attention() -> None:
    """Keep scaled_dot_product_attention off cuDNN on CUDA: cuDNN builds an execution plan for
    every new KV length, i.e. every decode step (1.5 ms of host time per call, measured on an
    H100); the flash and memory-efficient kernels need no plan."""
    torch.backends.cuda.enable_cudnn_sdp(False)


def _read_safetensors(model_dir: Path) -> dict[str, torch.Tensor]:
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {model_dir}")
    state: dict[str, torch.Tensor] = {}
    for path in files:
        state.update(load_file(str(path)))
    return state
