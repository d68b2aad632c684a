"""Frozen configuration for every layer, built from YAML, then LORASERVE_* env vars, then CLI flags.

Each component receives only its own section (ModelConfig, Limits, HttpConfig, ...); all of them are
validated on construction so a bad value stops the server at start with a message naming the key.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

import yaml

# configs/default.yaml is the file to read and edit; server/configs/default.yaml links to it so that
# it ships inside the package (a wheel copies the file), found the same way installed or not.
DEFAULT_CONFIG_PATH = Path(__file__).resolve().parent / "configs" / "default.yaml"
ENV_PREFIX = "LORASERVE_"


class ConfigError(ValueError):
    """A configuration value is missing, malformed or inconsistent."""


@dataclass(frozen=True)
class ModelConfig:
    model: str = "default"
    device: str = "auto"
    dtype: str = "auto"
    threads: int = 0
    cuda_graph_max_batch_size: int = 64  # decode steps up to this many rows replay CUDA graphs; 0 = off
    quantize: str = "none"  # "int8": weight-only int8 copies for small CPU decode steps
    kv_cache: str = "auto"  # paged | dense | auto (paged on CPU; dense on CUDA until a paged kernel lands there)
    prefix_caching: bool = True  # paged: reuse the KV blocks of a prompt prefix already computed for the same adapter

    def __post_init__(self) -> None:
        _check_choice("device", self.device, ("auto", "cpu", "cuda"))
        _check_choice("dtype", self.dtype, ("auto", "float32", "bfloat16", "float16"))
        _check_min("threads", self.threads, 0)
        _check_min("cuda_graph_max_batch_size", self.cuda_graph_max_batch_size, 0)
        _check_choice("quantize", self.quantize, ("none", "int8"))
        _check_choice("kv_cache", self.kv_cache, ("auto", "paged", "dense"))
        if not isinstance(self.prefix_caching, bool):
            raise ConfigError(f"prefix_caching must be true or false; got {self.prefix_caching!r}")
        if self.quantize == "int8" and self.device == "cuda":
            raise ConfigError("quantize int8 is a CPU option (its kernel is for small CPU decode steps)")


@dataclass(frozen=True)
class Limits:
    """Every token, sequence and adapter budget the scheduler enforces."""

    max_input_length: int = 1792
    max_total_tokens: int = 2048
    max_batch_total_tokens: int = 32768
    max_batch_prefill_tokens: int = 2048  # prompt tokens computed in one step; longer prompts are chunked
    max_batch_size: int = 32
    max_concurrent_requests: int = 128
    max_stop_sequences: int = 4
    max_stop_sequence_length: int = 256  # characters per stop sequence (matching cost grows with it)
    max_best_of: int = 4
    max_active_adapters: int = 0  # an optional cap on resident adapters; 0: bounded by max_adapter_memory_mb only
    max_adapter_memory_mb: int = 1024  # device memory for resident adapters' weights
    max_cached_schemas: int = 128  # compiled JSON-schema grammars kept (LRU)
    max_queue_wait_s: int = 60  # longest wait for a place in the running batch; beyond it: 429 overloaded
    kv_cache_memory_mb: int = 1024  # the paged KV pool, allocated and zeroed at start
    kv_block_size: int = 16  # tokens per KV block

    def __post_init__(self) -> None:
        for f in fields(self):
            _check_min(f.name, getattr(self, f.name), 0 if f.name == "max_active_adapters" else 1)
        if self.max_input_length >= self.max_total_tokens:
            raise ConfigError(
                f"max_input_length ({self.max_input_length}) must be < max_total_tokens ({self.max_total_tokens})"
            )
        if self.max_total_tokens > self.max_batch_total_tokens:
            raise ConfigError(
                f"max_total_tokens ({self.max_total_tokens}) must be <= max_batch_total_tokens "
                f"({self.max_batch_total_tokens}): one request must fit in the batch"
            )


@dataclass(frozen=True)
class AdapterConfig:
    adapters_dir: str = "adapters_cache"  # pbase store: <adapters_dir>/<repo>/<version>/
    adapter_roots: tuple[str, ...] = ()  # further directories the `local` source may read
    max_cpu_adapters: int = 32  # CPU-RAM LRU tier
    preload_adapters: tuple[str, ...] = ()  # loaded at start; dynamic loading stays on
    adapter_download_timeout_s: int = 300  # one remote (S3) adapter download, all retries included

    def __post_init__(self) -> None:
        _check_min("max_cpu_adapters", self.max_cpu_adapters, 1)
        _check_min("adapter_download_timeout_s", self.adapter_download_timeout_s, 1)


@dataclass(frozen=True)
class HttpConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    max_request_bytes: int = 4 * 1024 * 1024  # larger bodies get 413
    deployment_names: tuple[str, ...] = ("default",)  # accepted in /{tenant}/deployments/v2/llms/{name}/
    api_keys: tuple[str, ...] = ()  # bearer tokens accepted on every route but /health; none: no auth
    shutdown_grace_s: int = 30  # on SIGTERM: stop accepting, let in-flight requests finish this long

    def __repr__(self) -> str:  # never print the keys
        return f"HttpConfig(host={self.host!r}, port={self.port}, api_keys=<{len(self.api_keys)} keys>)"

    def __post_init__(self) -> None:
        _check_min("max_request_bytes", self.max_request_bytes, 1024)
        _check_min("shutdown_grace_s", self.shutdown_grace_s, 0)
        if any(len(k) < 8 for k in self.api_keys):
            raise ConfigError("api_keys must be at least 8 characters each")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port must be in 0..65535, got {self.port}")


@dataclass(frozen=True)
class ChatConfig:
    """How chat replies are read (server/structured/chat_format.py): "auto" recognises the format
    from the chat template's markers; a name forces one for every template."""

    tool_call_parser: str = "auto"  # auto | hermes | llama3_json | mistral | json
    reasoning_parser: str = "auto"  # auto | think (<think>...</think>) | none

    def __post_init__(self) -> None:
        _check_choice("tool_call_parser", self.tool_call_parser, ("auto", "hermes", "llama3_json", "mistral", "json"))
        _check_choice("reasoning_parser", self.reasoning_parser, ("auto", "think", "none"))


@dataclass(frozen=True)
class ControlConfig:
    """The control plane (server/control/): pre-signed URLs and the trainer process."""

    public_url: str = ""  # base of pre-signed URLs (behind a proxy); empty: each request's own base URL
    max_upload_mb: int = 100  # one pre-signed upload (a dataset or adapter file); larger: 413
    training_threads: int = 1  # torch CPU threads of a fine-tuning process (the engine keeps the rest)

    def __post_init__(self) -> None:
        _check_min("max_upload_mb", self.max_upload_mb, 1)
        _check_min("training_threads", self.training_threads, 1)
        if self.public_url and not self.public_url.startswith(("http://", "https://")):
            raise ConfigError(f"public_url must start with http:// or https://; got {self.public_url!r}")


@dataclass(frozen=True)
class Settings:
    model: ModelConfig = field(default_factory=ModelConfig)
    limits: Limits = field(default_factory=Limits)
    adapters: AdapterConfig = field(default_factory=AdapterConfig)
    http: HttpConfig = field(default_factory=HttpConfig)
    chat: ChatConfig = field(default_factory=ChatConfig)
    control: ControlConfig = field(default_factory=ControlConfig)


_SECTIONS = {"model": ModelConfig, "limits": Limits, "adapters": AdapterConfig, "http": HttpConfig,
             "chat": ChatConfig, "control": ControlConfig}


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


def _check_min(name: str, value: int, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}; got {value!r}")


def _coerce(name: str, raw: Any, target: Any) -> Any:
    if target in ("tuple[str, ...]", tuple):
        if isinstance(raw, str):  # env vars and flags: comma-separated
            return tuple(x.strip() for x in raw.split(",") if x.strip())
        if isinstance(raw, (list, tuple)) and all(isinstance(x, str) for x in raw):
            return tuple(raw)
        raise ConfigError(f"{name} must be a list of strings; got {raw!r}")
    if target in ("bool", bool) and isinstance(raw, str):
        if raw.strip().lower() in ("1", "true", "yes", "on"):
            return True
        if raw.strip().lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{name} must be true or false; got {raw!r}")
    if target in ("int", int) and isinstance(raw, str):
        try:
            return int(raw)
        except ValueError:
            raise ConfigError(f"{name} must be an integer; got {raw!r}") from None
    return raw


def _section_of(key: str) -> type:
    for cls in _SECTIONS.values():
        if key in {f.name for f in fields(cls)}:
            return cls
    raise ConfigError(f"unknown configuration key {key!r}")


def load_settings(
    path: str | Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Settings:
    """YAML file (--config, else $LORASERVE_CONFIG, else configs/default.yaml), then LORASERVE_<KEY>
    environment variables, then explicit overrides (CLI flags)."""
    environ = os.environ if environ is None else environ
    path = Path(path or environ.get(ENV_PREFIX + "CONFIG") or DEFAULT_CONFIG_PATH)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    flat: dict[str, Any] = yaml.safe_load(path.read_text()) or {}
    if not isinstance(flat, dict):
        raise ConfigError(f"{path}: expected a mapping of keys to values")
    for key in (f.name for section in _SECTIONS.values() for f in fields(section)):
        env_value = environ.get(ENV_PREFIX + key.upper())
        if env_value is not None:
            flat[key] = env_value
    flat.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return _build(flat)


def _build(flat: Mapping[str, Any]) -> Settings:
    per_section: dict[type, dict[str, Any]] = {cls: {} for cls in _SECTIONS.values()}
    for key, raw in flat.items():
        cls = _section_of(key)
        target = {f.name: f.type for f in fields(cls)}[key]
        per_section[cls][key] = _coerce(key, raw, target)
    try:
        return Settings(**{name: cls(**per_section[cls]) for name, cls in _SECTIONS.items()})
    except TypeError as exc:  # e.g. a list where a number belongs
        raise ConfigError(str(exc)) from None
