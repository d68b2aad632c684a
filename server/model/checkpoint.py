"""Read a checkpoint's safetensors (one file or shards with an index) into the decoder.

Tensors are read one at a time and copied straight into the decoder's parameters on the device,
converted to the model dtype on the way; q/k/v and gate/up land in row ranges of the fused
projections. So the peak is the model itself plus one tensor, never two copies of the weights.
Loading is strict: a tensor the decoder has no place for (a norm, a bias, a vision tower) means the
checkpoint is something the decoder does not run, and is refused rather than silently dropped.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from server.errors import StartupError, UnsupportedModelError
from server.model.layers import Projection

_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # buffers some older checkpoints saved; recomputed here

Route = tuple[str, slice]  # (parameter name, rows of it)


def weight_files(model_dir: Path) -> list[Path]:
    """The shards named by model.safetensors.index.json, else every *.safetensors file."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        files = [model_dir / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise StartupError(f"{model_dir}: shards listed in model.safetensors.index.json are missing: {missing[:3]}")
        return files
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        other = sorted(p.name for p in model_dir.glob("*.bin"))
        hint = f" (found {other[:2]}: convert PyTorch .bin weights to safetensors)" if other else ""
        raise StartupError(f"no *.safetensors weights in {model_dir}{hint}")
    return files


def weight_routes(model: nn.Module, tied_head: bool) -> dict[str, Route]:
    """Checkpoint tensor name -> where it goes. A fused projection takes either its parts' names
    (`q_proj`, `k_proj`, `v_proj`: Llama-style checkpoints) or its own (`qkv_proj`: Phi-3)."""
    routes: dict[str, Route] = {}
    for path, module in model.named_modules():
        if isinstance(module, Projection):
            parent = path.rpartition(".")[0]
            for kind in ("weight", "bias"):
                if getattr(module, kind) is None:
                    continue
                routes[f"{path}.{kind}"] = (f"{path}.{kind}", slice(None))
                start = 0
                for name, size in zip(module.names, module.sizes):
                    routes[f"{parent}.{name}.{kind}".lstrip(".")] = (f"{path}.{kind}", slice(start, start + size))
                    start += size
    fused = {name for name, _ in routes.values()}
    for name, _ in model.named_parameters():
        if name not in fused:
            routes[name] = (name, slice(None))
    if tied_head:
        routes.pop("lm_head.weight", None)
    return routes


def load_weights(model: nn.Module, model_dir: Path, device: torch.device, dtype: torch.dtype) -> None:
    """Fill the parameters of a decoder built on the meta device, one checkpoint tensor at a time."""
    tied = model.config.tie_word_embeddings
    routes = weight_routes(model, tied)
    filled: dict[str, int] = {}
    unexpected: list[str] = []
    for path in weight_files(model_dir):
        with safe_open(str(path), framework="pt", device="cpu") as shard:
            for key in shard.keys():
                if key in routes:
                    filled[key] = _copy_in(model, routes[key], shard.get_tensor(key), device, dtype)
                elif tied and key == "lm_head.weight" or key.endswith(_IGNORED_SUFFIXES):
                    continue
                else:
                    unexpected.append(key)
    if unexpected:
        raise UnsupportedModelError(f"the checkpoint has {len(unexpected)} weights this {model.config.model_type} "
                                    f"decoder has no place for (e.g. {unexpected[:3]}): it is a variant that "
                                    "is not supported")
    _check_complete(model, routes, filled, tied)
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight


def _copy_in(model: nn.Module, route: Route, tensor: torch.Tensor, device: torch.device, dtype: torch.dtype) -> int:
    name, rows = route
    if rows == slice(None) and tensor.device == device and tensor.dtype == dtype:
        return _adopt(model, name, tensor)  # already what the parameter must be: no second copy
    target = _materialize(model, name, device, dtype).data[rows]
    _check_shape(name, tensor, target.shape)
    target.copy_(tensor)
    return tensor.numel()


def _adopt(model: nn.Module, name: str, tensor: torch.Tensor) -> int:
    owner_path, _, attr = name.rpartition(".")
    owner = model.get_submodule(owner_path)
    _check_shape(name, tensor, getattr(owner, attr).shape)
    setattr(owner, attr, nn.Parameter(tensor, requires_grad=False))
    return tensor.numel()


def _check_shape(name: str, tensor: torch.Tensor, expected: torch.Size) -> None:
    if tensor.shape != expected:
        raise UnsupportedModelError(f"checkpoint tensor for {name} has shape {tuple(tensor.shape)}, but config.json "
                                    f"implies {tuple(expected)}")


def _materialize(model: nn.Module, name: str, device: torch.device, dtype: torch.dtype) -> nn.Parameter:
    """The parameter, allocated on the device on first use (the model was built on `meta`)."""
    owner_path, _, attr = name.rpartition(".")
    owner = model.get_submodule(owner_path)
    param = getattr(owner, attr)
    if param.is_meta:
        param = nn.Parameter(torch.empty(param.shape, device=device, dtype=dtype), requires_grad=False)
        setattr(owner, attr, param)
    return param


def _check_complete(model: nn.Module, routes: dict[str, Route], filled: dict[str, int], tied: bool) -> None:
    per_param: dict[str, int] = {}
    for key, count in filled.items():
        per_param[routes[key][0]] = per_param.get(routes[key][0], 0) + count
    missing = [name for name, p in model.named_parameters()
               if per_param.get(name, 0) != p.numel() and not (tied and name == "lm_head.weight")]
    if missing:
        raise StartupError(f"the checkpoint is missing weights: {missing[:5]}")
