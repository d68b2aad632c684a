"""CPU decode steps of a Llama-shaped bf16 model with every layer run by one C call
(kernels/decoder_cpu.c): the same kernels in the same order as the Python layer loop, so the same
bits, without ~270 Python calls a step and their checks (~3.5 ms of a 17 ms step at one row).

Taken where everything the loop would do is one of those kernels: a decode step, layers of the plain
pre-norm kind (RMSNorm, no q/k norms, SiLU, no soft-capping, one rotary table), weights blocked for
linear_cpu.c, decode attention by the paged cache's C kernel, and LoRA (if any) folded into the
projections. Anything else returns None from `run` and the Python loop runs the step.
"""

from __future__ import annotations

import ctypes
from typing import Any, Optional

import torch
import torch.nn.functional as F

from server.kernels import native
from server.kernels.elementwise import fused_kernels
from server.model.layers import INT8_MAX_ROWS, Projection, RMSNorm

PROJECTIONS = ("qkv", "o", "gate_up", "down")


class FusedDecode:
    """One model's static layer table (weights, norms, the cache's layers), filled once per cache and
    weight kind, and the per-step part: the rows' buffers, rotary tables, slots and LoRA pools."""

    def __init__(self, model: Any, kernel: native.DecodeLayersKernel) -> None:
        cfg = model.config
        self.kernel = kernel
        self.layers = list(model.model.layers)
        self.hidden, self.heads, self.kv_heads = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads
        self.dim, self.intermediate, self.eps = cfg.head_dim, cfg.intermediate_size, cfg.rms_norm_eps
        self.scale, self.rope_key = self.layers[0].self_attn.scale, self.layers[0].self_attn.rope_key
        self._tables: dict[bool, Optional[ctypes.Array]] = {}  # int8 -> the layer table (None: not fusable)
        self._cache: Any = None  # the KV cache the tables point into

    @classmethod
    def for_model(cls, model: Any) -> Optional["FusedDecode"]:
        """The fused path for this model, or None where its layers are not all of the kind it runs."""
        from server.model.decoder import DecoderLayer

        layers = list(model.model.layers)
        if not layers or not all(type(layer) is DecoderLayer and _fusable(layer) for layer in layers):
            return None
        shared = ({layer.self_attn.rope_key for layer in layers}, {layer.self_attn.scale for layer in layers},
                  {norm.eps for layer in layers for norm in (layer.input_layernorm, layer.post_attention_layernorm)})
        if any(len(values) != 1 for values in shared):  # (one rotary table, scale and epsilon for every layer)
            return None
        kernel = native.decode_layers_kernel()
        return None if kernel is None else cls(model, kernel)

    def run(self, batch: Any, kv: Any, step: Any, h: torch.Tensor) -> Optional[torch.Tensor]:
        """The residual stream after the last layer ([rows, hidden] bf16: x plus the last block's
        output), or None where this step needs the Python loop."""
        rows = h.shape[0]
        if fused_kernels(h) is None:  # (the elementwise kernels turned off: torch ops everywhere)
            return None
        if not (batch.is_decode and h.dtype == torch.bfloat16 and h.is_contiguous() and kv.attends_in_place(batch)):
            return None
        cos, sin = step.rope[self.rope_key]
        if not all(t.dtype == torch.bfloat16 and t.is_contiguous() and t.shape == (rows, 1, self.dim)
                   for t in (cos, sin)):
            return None
        gather, lens = batch.kv_index.gather, batch.kv_lens
        if not (gather.dtype == lens.dtype == torch.int64 and gather.is_contiguous() and lens.is_contiguous()
                and gather.shape[0] == lens.shape[0] == rows and batch.kv_index.slot_mapping.shape == (rows,)):
            return None
        int8 = rows <= INT8_MAX_ROWS and self.layers[0].self_attn.qkv_proj.int8 is not None
        table = self._table(kv, int8)
        lora = batch.lora
        if table is not None and lora is not None:
            table = self._with_pools(table, lora, rows)
        if table is None:
            return None
        buffers = self._buffers(rows)
        scratch = torch.empty(max(1, self.heads // self.kv_heads) * gather.shape[1], dtype=torch.float32)
        lo, width, order = lora.step.pointers if lora is not None else (None, None, None)
        plan = native.DecodeStep(rows, self.hidden, self.heads, self.kv_heads, self.dim, self.intermediate,
                                 kv.keys[0].shape[0], gather.shape[1], self.eps, self.scale, h.data_ptr(),
                                 *(b.data_ptr() for b in buffers), cos.data_ptr(), sin.data_ptr(),
                                 batch.kv_index.slot_mapping.data_ptr(), gather.data_ptr(), lens.data_ptr(),
                                 scratch.data_ptr(), lo, width, order)
        self.kernel(plan, table)
        return h + buffers[-1]  # (the Python stream's value(): x + the last block's output)

    def _buffers(self, rows: int) -> list[torch.Tensor]:
        """normed, qkv, attn, o_out, gate_up, act, down_out: the step's intermediate rows."""
        widths = (self.hidden, (self.heads + 2 * self.kv_heads) * self.dim, self.heads * self.dim, self.hidden,
                  2 * self.intermediate, self.intermediate, self.hidden)
        return [torch.empty(rows, w, dtype=torch.bfloat16) for w in widths]

    def _table(self, kv: Any, int8: bool) -> Optional[ctypes.Array]:
        """The layer table over this cache, built once per cache and weight kind (None, kept too:
        these weights or this cache can't be fused)."""
        if kv is not self._cache:  # (one cache per engine; a new one gets new tables)
            self._cache, self._tables = kv, {}
        if int8 not in self._tables:
            self._tables[int8] = _layer_table(self.layers, kv, int8)
        return self._tables[int8]

    def _with_pools(self, table: ctypes.Array, lora: Any, rows: int) -> Optional[ctypes.Array]:
        """A copy of the table with each projection's LoRA pool for this step, or None where the plan
        does not fold the LoRA into the projections (the Python loop adds the deltas itself)."""
        from server.adapters.lora import TokenColumns  # (it imports the model)

        if not isinstance(lora, TokenColumns) or lora.step is None or lora.step.tokens != rows:
            return None
        layers = (native.DecodeLayer * len(table))()
        ctypes.memmove(layers, table, ctypes.sizeof(layers))
        for entry, layer in zip(layers, self.layers):
            for name, projection in zip(PROJECTIONS, _projections(layer)):
                parts = [target.lora for target in projection.target_list]
                if all(part is None for part in parts):
                    continue
                group = parts[0].group if parts[0] is not None else None
                if group is None or group.pool is None:
                    return None
                getattr(entry, name).pool = ctypes.addressof(group.pool)
        return layers


def _fusable(layer: Any) -> bool:
    attention, mlp = layer.self_attn, layer.mlp
    norms = (layer.input_layernorm, layer.post_attention_layernorm)
    return (all(type(n) is RMSNorm and n.weight.dtype == torch.bfloat16 and n.weight.is_contiguous() for n in norms)
            and attention.q_norm is None and attention.softcap is None and mlp.act is F.silu
            and all(p.blocked is not None for p in _projections(layer)))


def _projections(layer: Any) -> tuple[Projection, ...]:
    return layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj


def _layer_table(layers: list, kv: Any, int8: bool) -> Optional[ctypes.Array]:
    """Each layer's norms, weights (bf16 blocks, or the int8 copies' where `int8`) and cache layers."""
    table = (native.DecodeLayer * len(layers))()
    for i, (entry, layer) in enumerate(zip(table, layers)):
        k_cache, v_cache = kv.layer(i)
        if not (k_cache.dtype == v_cache.dtype == torch.bfloat16 and k_cache.is_contiguous()
                and v_cache.is_contiguous()):
            return None
        entry.in_norm = layer.input_layernorm.weight.data_ptr()
        entry.post_norm = layer.post_attention_layernorm.weight.data_ptr()
        entry.k_cache, entry.v_cache = k_cache.data_ptr(), v_cache.data_ptr()
        entry.window = layer.self_attn.window or 0
        for name, projection in zip(PROJECTIONS, _projections(layer)):
            weight = projection.int8.blocked if int8 and projection.int8 is not None else projection.blocked
            if weight is None:
                return None
            scales = weight.scales.data_ptr() if isinstance(weight, native.BlockedInt8) else None
            bias = weight.bias.data_ptr() if weight.bias is not None else None
            setattr(entry, name, native.DecodeProjection(weight.blocks.data_ptr(), scales, bias, None,
                                                         weight.in_features, weight.out_features))
    return table
