"""Resolve `--model` to a local directory, pick device and dtype, and load model + tokenizer."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from server.config import ModelConfig
from server.model.decoder import CausalLM, prefer_planless_attention
from server.model.default_model import DEFAULT_MODEL_NAME, default_model_dir
from server.model.generation import GenerationDefaults
from server.model.layers import quantize_int8

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class LoadedModel:
    name: str  # what /info and the OpenAI `model` field call the base model
    model_dir: Path
    model: CausalLM
    tokenizer: PreTrainedTokenizerBase
    device: torch.device
    dtype: torch.dtype
    generation: GenerationDefaults = GenerationDefaults()

    @property
    def eos_token_ids(self) -> frozenset[int]:
        """The tokenizer's EOS and every id generation_config.json ends on."""
        ids = {self.tokenizer.eos_token_id, *self.generation.eos_token_ids}
        generation = getattr(self.tokenizer, "init_kwargs", {}).get("eos_token_id")
        if isinstance(generation, int):
            ids.add(generation)
        return frozenset(i for i in ids if i is not None)

    @property
    def special_token_ids(self) -> frozenset[int]:
        return frozenset(self.tokenizer.all_special_ids)


def resolve_model_dir(model: str) -> tuple[str, Path]:
    """'default' -> the converted embedded model; a directory -> itself; else a hub id."""
    if model == "default":
        return DEFAULT_MODEL_NAME, default_model_dir()
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} has no config.json: not a Hugging Face model directory")
        return path.name, path
    from huggingface_hub import snapshot_download  # only needed for hub ids

    local = snapshot_download(model, allow_patterns=["*.json", "*.safetensors", "*.model", "*.jinja", "*.txt"])
    return model, Path(local)


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was requested but no CUDA device is available")
    return torch.device(device)


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" or cpu_has_native_bf16() else torch.float32
    return _DTYPES[dtype]


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: bf16 matmuls run natively and read half the bytes of fp32, so decode
    (memory-bound) is about 2x faster. Without them bf16 is emulated and slower than fp32."""
    try:
        return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    except AttributeError:  # private probes; a torch without them gets the safe choice
        return False


def load_model(config: ModelConfig) -> LoadedModel:
    if config.threads:
        torch.set_num_threads(config.threads)
    name, model_dir = resolve_model_dir(config.model)
    device = pick_device(config.device)
    dtype = pick_dtype(config.dtype, device)
    log.info("loading %s from %s on %s as %s", name, model_dir, device, dtype)
    if device.type == "cuda":
        prefer_planless_attention()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = CausalLM.from_pretrained(model_dir, device, dtype)
    if config.quantize == "int8":
        if dtype != torch.bfloat16:  # with fp32 activations the int8 kernel is slower than fp32 weights
            raise ValueError(f"quantize int8 needs dtype bfloat16; the model runs as {dtype}"
                             + (" because this CPU has no native bf16" if config.dtype == "auto" else ""))
        log.info("int8 decode weights: %.0f MB added", quantize_int8(model) / 2**20)
    return LoadedModel(name, model_dir, model, tokenizer, device, dtype, GenerationDefaults.read(model_dir))

