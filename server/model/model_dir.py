"""Checks on a `--model` that names a local directory. Kept free of torch and transformers so the
CLI can refuse a mistyped path within a fraction of a second, before the slow imports."""

from __future__ import annotations

from pathlib import Path

from server.errors import StartupError

_PATH_PREFIXES = ("/", "./", "../", "~")


def local_model_dir(model: str) -> Path | None:
    """The model directory `model` names, checked, or None for a hub id. Anything spelled like a
    path is a path, so a typo fails here instead of as a confusing hub lookup."""
    path = Path(model).expanduser()
    if not (model.startswith(_PATH_PREFIXES) or model in (".", "..") or path.exists()):
        return None
    if not path.exists():  # absolute: in a container the working directory is not obvious
        raise StartupError(f"no such directory: {path.absolute()} (--model takes \"default\", a Hugging Face model "
                           "directory, or a hub id)")
    if not path.is_dir():
        raise StartupError(f"not a directory: {path} (--model takes the directory holding config.json, "
                           "the *.safetensors weights and the tokenizer)")
    if not (path / "config.json").is_file():
        raise StartupError(f"not a Hugging Face model directory (no config.json): {path}")
    return path
