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
MAX_DIMS = 8  # dimensions a header's tensor shape may have
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
    """One adapter in CPU memory, in the serving dtype. Identity-hashed: the tiers track the object itself."""

    key: AdapterKey
    rank: int  # widest rank over modules: the columns it occupies when packed
    modules: dict[tuple[int, str], LoraPair]  # (layer, proj) -> (A [r, in], B * scale [out, r]); may be views
    path: Optional[Path] = None
    chat_template: Optional[str] = None
    config: dict[str, Any] = field(default_factory=dict)
    serial: int = field(default_factory=lambda: next(_serials))  # this load's identity (KV prefix-cache keys)

    @property
    def size_bytes(self) -> int:
        """Bytes held, each shared tensor (a fused projection's A) once."""
        held = {t.data_ptr(): t.numel() * t.element_size() for pair in self.modules.values() for t in pair}
        return sum(held.values())

    @property
    def dtype(self) -> torch.dtype:
        return next(iter(self.modules.values()))[0].dtype

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
            out[(layer, part)] = (a, b[start : start + sizes[part]])  # a view: activation copies it
            start += sizes[part]
    return out


def read_adapter(key: AdapterKey, directory: Path, arch: ArchConfig, dtype: torch.dtype = torch.float32,
                 buffer: Optional["ReadBuffer"] = None) -> AdapterWeights:
    """The adapter in `dtype` (the serving dtype). `buffer`: the calling loader thread's own, kept
    between its loads; by default a fresh one."""
    config = _read_config(key, directory)
    tensors = _read_tensors(key, directory, buffer or ReadBuffer(keep_bytes=0))
    modules = split_fused(_factors(key, tensors, config, arch, dtype), arch)
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


class ReadBuffer:
    """A loader thread's buffer for adapter files, kept between its loads when the file fits in
    `keep_bytes`. Memory touched for the first time costs a page fault per page, and on a VM a
    fault the host must back: on the development VM a load that allocated its buffers afresh took
    50 ms of CPU against 9 ms when they were reused (bench notes in docs/benchmarks.md). Files go
    through here; only the adapter's own tensors, in the serving dtype, are new memory."""

    def __init__(self, keep_bytes: int = 256 * 2**20) -> None:
        self.keep_bytes = keep_bytes
        self._kept: Optional[torch.Tensor] = None

    def take(self, size: int) -> torch.Tensor:
        """`size` bytes (uint8), valid until the next take."""
        if self._kept is not None and self._kept.numel() >= size:
            return self._kept[:size]
        fresh = torch.empty(size, dtype=torch.uint8)
        if size <= self.keep_bytes:
            self._kept = fresh
        return fresh


@dataclass
class FileTensors:
    """A safetensors file's tensors by name. Read in one call into one buffer when they share one
    float dtype (what peft writes): views on demand, and `stacked` views of evenly spaced ones
    without a copy. Else (mixed dtypes) what safetensors itself reads."""

    shapes: dict[str, tuple[int, ...]]
    flat: Optional[torch.Tensor] = None  # the tensor data, in their one dtype
    offsets: dict[str, int] = field(default_factory=dict)  # element offset of each tensor in `flat`
    loaded: dict[str, torch.Tensor] = field(default_factory=dict)  # the safetensors read, when not flat

    def tensor(self, name: str) -> torch.Tensor:
        if self.flat is None:
            return self.loaded[name]
        begin = self.offsets[name]
        return self.flat[begin : begin + math.prod(self.shapes[name])].view(self.shapes[name])

    def stacked(self, names: list[str]) -> Optional[torch.Tensor]:
        """[n, *shape] of these same-shaped tensors as one strided view of the buffer, when they lie
        at evenly spaced offsets in this order (peft's files: each layer's block the same size);
        None otherwise."""
        if self.flat is None:
            return None
        begins = [self.offsets[name] for name in names]
        step = begins[1] - begins[0] if len(begins) > 1 else 1
        if step <= 0 or any(b - a != step for a, b in zip(begins, begins[1:])):
            return None
        shape = self.shapes[names[0]]
        inner = [math.prod(shape[i + 1 :]) for i in range(len(shape))]
        return self.flat.as_strided((len(names), *shape), (step, *inner), self.flat.storage_offset() + begins[0])


def _read_tensors(key: AdapterKey, directory: Path, buffer: ReadBuffer) -> FileTensors:
    """The file's tensors, each checked to be finite floating point."""
    path = directory / "adapter_model.safetensors"
    if not path.is_file():
        raise AdapterNotFoundError(f"adapter {key} not found: no adapter_model.safetensors")
    try:
        tensors = _read_one_dtype(path, buffer)
        if tensors is None:
            loaded = load_file(str(path))
            tensors = FileTensors({k: tuple(v.shape) for k, v in loaded.items()}, loaded=loaded)
    except (SafetensorError, OSError, ValueError, KeyError, TypeError, OverflowError, struct.error) as exc:
        raise AdapterLoadError(f"adapter {key}: corrupt adapter_model.safetensors ({exc})") from None
    # one sum over the whole buffer: a NaN or inf anywhere makes it non-finite (so does an overflow,
    # which the check of each tensor that follows then clears), and names the weight
    if tensors.flat is None or not math.isfinite(float(tensors.flat.sum())):
        for name in tensors.shapes:
            tensor = tensors.tensor(name)
            if not tensor.is_floating_point() or not torch.isfinite(tensor).all():
                raise AdapterLoadError(f"adapter {key}: weight {name!r} is not finite floating point")
    return tensors


def _read_one_dtype(path: Path, buffer: ReadBuffer) -> Optional[FileTensors]:
    """A file whose tensors share one float dtype, read in one call into `buffer` (the GIL released
    while it reads), its header checked as safetensors checks it; None for anything else."""
    with path.open("rb") as f:
        size = os.fstat(f.fileno()).st_size
        data = buffer.take(size)
        if f.readinto(memoryview(data.numpy())) != size:
            raise ValueError("short read")
    (header_len,) = struct.unpack_from("<Q", data.numpy(), 0)
    if 8 + header_len > size:
        raise ValueError("header runs past the end of the file")
    header = json.loads(data[8 : 8 + header_len].numpy().tobytes())
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
    tensors, covered = FileTensors({}, data[8 + header_len : 8 + header_len + end].view(dtype)), 0
    for name, entry in sorted(header.items(), key=lambda item: item[1]["data_offsets"][0]):
        begin, stop = (int(o) for o in entry["data_offsets"])
        shape = _shape(name, entry["shape"])
        # laid end to end, each as long as its shape says (what safetensors itself checks)
        if begin != covered or stop - begin != math.prod(shape) * item:
            raise ValueError(f"tensor {name!r} has inconsistent offsets")
        tensors.shapes[name], tensors.offsets[name] = shape, begin // item
        covered = stop
    return tensors


def _shape(name: str, raw: Any) -> tuple[int, ...]:
    """A tensor's shape from the header: a short list of non-negative integers (a LoRA factor has
    two; a list of thousands would take the interpreter seconds to multiply out, with the GIL held)."""
    if (not isinstance(raw, list) or len(raw) > MAX_DIMS
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in raw)):
        raise ValueError(f"tensor {name!r} has a malformed shape")
    return tuple(raw)


Module = tuple[int, str]  # (layer, projection)


def _factors(key: AdapterKey, tensors: FileTensors, config: dict[str, Any], arch: ArchConfig,
             dtype: torch.dtype) -> dict[Module, LoraPair]:
    """Every module's (A, B * scale) in `dtype`, written straight from the file's buffer: the
    modules of one projection and rank as one [n, r, in] tensor and one [n, r, out] (B^T, the
    packed orientation), a few large copies rather than hundreds of small ones (loads share the
    interpreter with decoding). The returned pairs are views of those."""
    names = _pair_names(key, tensors.shapes, arch)
    groups: dict[tuple[str, int], list[Module]] = {}
    for module, (a_name, _) in names.items():
        groups.setdefault((module[1], tensors.shapes[a_name][0]), []).append(module)
    out: dict[Module, LoraPair] = {}
    for members in groups.values():
        members.sort(key=lambda m: tensors.offsets.get(names[m][0], 0))  # file order: strided views
        a = _copy_stacked(tensors, [names[m][0] for m in members], dtype)  # [n, r, in]
        scales = torch.tensor([_scale(_module_name(m), a.shape[1], config) for m in members]).view(-1, 1, 1)
        b_t = _copy_stacked(tensors, [names[m][1] for m in members], dtype, transpose=True, scales=scales)
        out.update(zip(members, zip(a.unbind(0), b_t.transpose(1, 2).unbind(0))))
    return out


def _copy_stacked(tensors: FileTensors, names: list[str], dtype: torch.dtype, transpose: bool = False,
                  scales: Optional[torch.Tensor] = None) -> torch.Tensor:
    """[n, *shape] (each transposed when `transpose`, each times its scale) in new memory of `dtype`:
    one op over a strided view of the file when it allows, else one per tensor. The product is in
    float32 (the scales' dtype), then rounded once to `dtype`."""
    shape = tensors.shapes[names[0]]
    out = torch.empty(len(names), *(shape[::-1] if transpose else shape), dtype=dtype)
    stacked = tensors.stacked(names)
    sources = [stacked] if stacked is not None else [tensors.tensor(n).unsqueeze(0) for n in names]
    start = 0
    for source in sources:
        part = out[start : start + source.shape[0]]
        source = source.transpose(1, 2) if transpose else source
        if scales is None:
            part.copy_(source)
        else:
            torch.mul(source, scales[start : start + source.shape[0]], out=part)
        start += source.shape[0]
    return out


def _module_name(module: Module) -> str:
    layer, proj = module
    block = "mlp" if proj in ("gate_proj", "up_proj", "down_proj", "gate_up_proj") else "self_attn"
    return f"model.layers.{layer}.{block}.{proj}"


def _pair_names(key: AdapterKey, shapes: dict[str, tuple[int, ...]], arch: ArchConfig) -> dict[Module, tuple[str, str]]:
    """Each module's (lora_A name, lora_B name), from the header alone: every weight a LoRA factor of
    a projection this base model has, both factors present, shapes this model's, ranks in bounds."""
    projections = projection_shapes(arch)
    halves: dict[Module, dict[str, str]] = {}
    for name in shapes:
        match = _KEY.search(name)
        if match is None:
            where = "the embeddings or the LM head" if re.search(r"embed|lm_head", name) else "this module"
            raise AdapterLoadError(f"adapter {key}: unsupported weight {name!r}: LoRA on {where} is not supported "
                                   "(only the attention and MLP projections)")
        layer, proj, half = int(match.group(1)), match.group(2), match.group(3)
        if proj not in projections or layer >= arch.num_layers:
            raise AdapterLoadError(f"adapter {key}: weight {name!r} targets a module the base model does not have")
        halves.setdefault((layer, proj), {})[half] = name
    if not halves:
        raise AdapterLoadError(f"adapter {key}: no LoRA weights found")
    for module, pair in halves.items():
        _check_shapes(key, module, pair, shapes, projections[module[1]])
    return {module: (pair["A"], pair["B"]) for module, pair in halves.items()}


def _check_shapes(key: AdapterKey, module: Module, pair: dict[str, str], shapes: dict[str, tuple[int, ...]],
                  shape: tuple[int, int]) -> None:
    layer, proj = module
    if set(pair) != {"A", "B"}:
        raise AdapterLoadError(f"adapter {key}: layer {layer} {proj} lacks lora_A or lora_B")
    a, b = shapes[pair["A"]], shapes[pair["B"]]
    out_features, in_features = shape
    rank = a[0] if a else 0
    if a != (rank, in_features) or b != (out_features, rank):
        raise AdapterLoadError(
            f"adapter {key}: layer {layer} {proj} has shapes A{a} B{b}, but the base model "
            f"needs A[r, {in_features}] B[{out_features}, r]: it was trained for a different base model"
        )
    if not 1 <= rank <= MAX_RANK:
        raise AdapterLoadError(f"adapter {key}: rank {rank} outside 1..{MAX_RANK}")


def _scale(module_name: str, rank: int, config: dict[str, Any]) -> float:
    alpha = config.get("lora_alpha", 8)
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?{pattern}$", module_name):
            alpha = value
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
