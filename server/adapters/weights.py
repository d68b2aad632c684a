"""Reading and validating a PEFT LoRA adapter directory into CPU tensors ready for packing.

Validation happens here, once, off the engine loop: file integrity, LoRA type, target modules,
layer indices, shapes against the base model, rank, finiteness. Scales (alpha / r, or alpha /
sqrt(r) for rsLoRA, with per-module rank and alpha patterns) are folded into B.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
import struct
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from server.errors import GenerationError
from server.model.arch import ArchConfig

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}  # Phi-3's modules
MAX_RANK = 256
_KEY = re.compile(r"layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])(?:\.[\w-]+)?\.weight$")


LoraPair = tuple[torch.Tensor, torch.Tensor]
_serials = itertools.count(1)  # 0 is the base model


class AdapterLoadError(GenerationError):
    """The adapter exists but can't be served on this base model (424, error_type generation)."""


class AdapterNotFoundError(GenerationError):
    """No adapter with that id in that source (424, worded as a 404)."""


@dataclass(frozen=True)
class AdapterKey:
    source: str  # pbase | local | hub | s3 | merged
    id: str

    def __str__(self) -> str:
        return self.id if self.source in ("pbase", "local") else f"{self.source}:{self.id}"


@dataclass(eq=False)
class AdapterWeights:
    """One adapter in CPU memory. Identity-hashed: the tiers track the object itself."""

    key: AdapterKey
    rank: int  # widest rank over modules: the columns it occupies when packed
    modules: dict[tuple[int, str], LoraPair]  # (layer, proj) -> (A [r, in], B * scale [out, r])
    path: Optional[Path] = None
    chat_template: Optional[str] = None
    config: dict[str, Any] = field(default_factory=dict)
    serial: int = field(default_factory=lambda: next(_serials))  # this load's identity (KV prefix-cache keys)
    # (dtype, rows in the device tier's packed layout), made on the loader thread and taken by the first
    # activation, so the engine thread only copies them in (server.adapters.lora.ResidentAdapters.stage)
    staged: Optional[tuple[torch.dtype, dict]] = field(default=None, repr=False)

    @property
    def size_bytes(self) -> int:
        return sum(a.numel() * a.element_size() + b.numel() * b.element_size() for a, b in self.modules.values())

    @property
    def target_modules(self) -> list[str]:
        return sorted({name for _, name in self.modules})


def projection_shapes(arch: ArchConfig) -> dict[str, tuple[int, int]]:
    """(out_features, in_features) of each projection an adapter may target: the model's own
    modules, so Phi-3 adapters name the fused `qkv_proj` and `gate_up_proj`."""
    q, kv = arch.num_heads * arch.head_dim, arch.num_kv_heads * arch.head_dim
    h, i = arch.hidden_size, arch.intermediate_size
    shapes = {"q_proj": (q, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, q),
              "gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i)}
    if not arch.fused_projections:
        return shapes
    fused = {name: (sum(shapes[p][0] for p in parts), h) for name, parts in FUSED.items()}
    return {**fused, "o_proj": shapes["o_proj"], "down_proj": shapes["down_proj"]}


def split_fused(modules: dict[tuple[int, str], LoraPair], arch: ArchConfig) -> dict[tuple[int, str], LoraPair]:
    """A LoRA on a fused projection is exactly one LoRA per part sharing A, with B cut by rows
    (q/k/v and gate/up are stacked in that order in the fused weight)."""
    if not arch.fused_projections:
        return modules
    sizes = {name: shape[0] for name, shape in projection_shapes(replace(arch, fused_projections=False)).items()}
    out: dict[tuple[int, str], LoraPair] = {}
    for (layer, proj), (a, b) in modules.items():
        start = 0
        for part in FUSED.get(proj, (proj,)):
            out[(layer, part)] = (a, b[start : start + sizes[part]].contiguous())
            start += sizes[part]
    return out


def read_adapter(key: AdapterKey, directory: Path, arch: ArchConfig) -> AdapterWeights:
    config = _read_config(key, directory)
    tensors = _read_tensors(key, directory)
    modules = split_fused(_pair_modules(key, tensors, config, arch), arch)
    template = directory / "chat_template.jinja"
    return AdapterWeights(
        key=key,
        rank=max(a.shape[0] for a, _ in modules.values()),
        modules=modules,
        path=directory,
        chat_template=template.read_text() if template.is_file() else None,
        config=config,
    )


def _read_config(key: AdapterKey, directory: Path) -> dict[str, Any]:
    path = directory / "adapter_config.json"
    if not path.is_file():
        raise AdapterNotFoundError(f"adapter {key} not found: no adapter_config.json")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterLoadError(f"adapter {key}: adapter_config.json is not valid JSON ({exc})") from None
    if str(config.get("peft_type", "LORA")).upper() != "LORA":
        raise AdapterLoadError(f"adapter {key}: peft_type {config.get('peft_type')!r} is not LORA")
    for flag in ("use_dora", "fan_in_fan_out"):
        if config.get(flag):
            raise AdapterLoadError(f"adapter {key}: {flag}=true is not supported")
    if config.get("modules_to_save"):
        raise AdapterLoadError(f"adapter {key}: modules_to_save is not supported (LoRA weights only)")
    if config.get("bias", "none") != "none":
        raise AdapterLoadError(f"adapter {key}: bias={config['bias']!r} is not supported")
    return config


_FLOAT_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def _read_tensors(key: AdapterKey, directory: Path) -> dict[str, torch.Tensor]:
    """The file's tensors, each checked to be finite floating point."""
    path = directory / "adapter_model.safetensors"
    if not path.is_file():
        raise AdapterNotFoundError(f"adapter {key} not found: no adapter_model.safetensors")
    try:
        read = _read_one_dtype(path)
        tensors = read[0] if read is not None else load_file(str(path))
    except (SafetensorError, OSError, ValueError, KeyError, TypeError, struct.error) as exc:
        raise AdapterLoadError(f"adapter {key}: corrupt adapter_model.safetensors ({exc})") from None
    # one sum over the whole buffer: a NaN or inf anywhere makes it non-finite (so does an overflow,
    # which the check of each tensor that follows then clears), and names the weight
    if read is None or not math.isfinite(float(read[1].sum())):
        for name, tensor in tensors.items():
            if not tensor.is_floating_point() or not torch.isfinite(tensor).all():
                raise AdapterLoadError(f"adapter {key}: weight {name!r} is not finite floating point")
    return tensors


def _read_one_dtype(path: Path) -> Optional[tuple[dict[str, torch.Tensor], torch.Tensor]]:
    """A safetensors file whose tensors share one float dtype (what peft writes), read in one call
    and viewed out of one buffer: (tensors, that buffer). A few hundred tensors then cost one read
    and one finiteness check instead of an allocation and a check each (loads run beside decoding).
    None for anything else, which safetensors itself reads."""
    with path.open("rb") as f:
        size = os.fstat(f.fileno()).st_size
        buffer = torch.empty(size, dtype=torch.uint8)  # untouched pages: the read fills them, the GIL released
        if f.readinto(memoryview(buffer.numpy())) != size:
            raise ValueError("short read")
    (header_len,) = struct.unpack_from("<Q", buffer.numpy(), 0)
    if 8 + header_len > size:
        raise ValueError("header runs past the end of the file")
    header = json.loads(buffer[8 : 8 + header_len].numpy().tobytes())
    if not isinstance(header, dict) or not all(isinstance(e, dict) for k, e in header.items() if k != "__metadata__"):
        raise ValueError("the header is not a table of tensors")
    header.pop("__metadata__", None)
    dtypes = {entry["dtype"] for entry in header.values()}
    if len(dtypes) != 1 or (dtype := _FLOAT_DTYPES.get(dtypes.pop())) is None or (8 + header_len) % dtype.itemsize:
        return None
    item = dtype.itemsize
    end = max(entry["data_offsets"][1] for entry in header.values())
    if end % item or 8 + header_len + end > size:
        raise ValueError("tensor data runs past the end of the file")
    flat = buffer[8 + header_len : 8 + header_len + end].view(dtype)
    tensors, covered = {}, 0
    for name, entry in sorted(header.items(), key=lambda item: item[1]["data_offsets"][0]):
        begin, stop = (int(o) for o in entry["data_offsets"])
        shape = [int(d) for d in entry["shape"]]
        # laid end to end, each as long as its shape says (what safetensors itself checks)
        if begin != covered or min(shape, default=0) < 0 or stop - begin != math.prod(shape) * item:
            raise ValueError(f"tensor {name!r} has inconsistent offsets")
        tensors[name] = flat[begin // item : stop // item].view(shape)
        covered = stop
    return tensors, flat


def _pair_modules(key: AdapterKey, tensors: dict[str, torch.Tensor], config: dict[str, Any], arch: ArchConfig):
    shapes = projection_shapes(arch)
    halves: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        match = _KEY.search(name)
        if match is None:
            where = "the embeddings or the LM head" if re.search(r"embed|lm_head", name) else "this module"
            raise AdapterLoadError(f"adapter {key}: unsupported weight {name!r}: LoRA on {where} is not supported "
                                   "(only the attention and MLP projections)")
        layer, proj, half = int(match.group(1)), match.group(2), match.group(3)
        if proj not in shapes or layer >= arch.num_layers:
            raise AdapterLoadError(f"adapter {key}: weight {name!r} targets a module the base model does not have")
        # a copy for A (B gets scaled into one): a view would keep the whole file's buffer alive
        halves.setdefault((layer, proj), {})[half] = tensor.to(torch.float32, copy=half == "A")
    if not halves:
        raise AdapterLoadError(f"adapter {key}: no LoRA weights found")
    return {k: _check_pair(key, k, h, shapes[k[1]], config) for k, h in halves.items()}


def _check_pair(key: AdapterKey, where: tuple[int, str], halves: dict[str, torch.Tensor], shape: tuple[int, int],
                config: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    layer, proj = where
    if set(halves) != {"A", "B"}:
        raise AdapterLoadError(f"adapter {key}: layer {layer} {proj} lacks lora_A or lora_B")
    a, b = halves["A"], halves["B"]
    out_features, in_features = shape
    rank = a.shape[0]
    if a.shape != (rank, in_features) or b.shape != (out_features, rank):
        raise AdapterLoadError(
            f"adapter {key}: layer {layer} {proj} has shapes A{tuple(a.shape)} B{tuple(b.shape)}, but the base model "
            f"needs A[r, {in_features}] B[{out_features}, r]: it was trained for a different base model"
        )
    if not 1 <= rank <= MAX_RANK:
        raise AdapterLoadError(f"adapter {key}: rank {rank} outside 1..{MAX_RANK}")
    block = "mlp" if proj in ("gate_proj", "up_proj", "down_proj", "gate_up_proj") else "self_attn"
    return a.contiguous(), (b * _scale(f"model.layers.{layer}.{block}.{proj}", rank, config)).contiguous()


def _scale(module_name: str, rank: int, config: dict[str, Any]) -> float:
    alpha = config.get("lora_alpha", 8)
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?{pattern}$", module_name):
            alpha = value
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
