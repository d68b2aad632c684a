"""Assemble model, KV cache, scheduler, runner and engine from Settings, and warm them up."""

from __future__ import annotations

import gc
import logging
import re
import time
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Callable

import torch

from server.adapters.lora import ResidentAdapters
from server.adapters.store import SOURCE_NAMES, AdapterStore, AdapterStoreConfig
from server.config import AdapterConfig, Limits, ModelConfig, Settings
from server.engine.async_engine import AsyncEngine
from server.engine.cpu_threads import CpuThreads
from server.engine.cuda_graphs import DecodeGraphs
from server.engine.detokenizer import IncrementalDetokenizer
from server.engine.engine import Engine
from server.engine.kv_cache import KVCache, PagedKVCache
from server.engine.request import Request, SamplingParams, StopCriteria
from server.engine.runner import ModelRunner
from server.engine.scheduler import Scheduler, SchedulerBudget
from server.errors import ServingError, StartupError, one_line
from server.kernels.lora_triton import triton_kernels
from server.model.default_model import loraserve_home
from server.model.loader import LoadedModel, load_model_explained, resolve_model_dir
from server.structured.guide import GuideFactory

log = logging.getLogger(__name__)
_CPU_BYTES = re.compile(r"allocate (\d+) bytes")


class StartPhase(str, Enum):
    """What a starting server is doing, in order; /health reports it until the engine runs."""

    RESOLVING = "resolving"  # finding the model directory (a hub id downloads here)
    CONVERTING = "converting"  # the default model's one-time GGUF conversion (about 30 s)
    LOADING_WEIGHTS = "loading_weights"  # tokenizer and weights onto the device
    ALLOCATING_KV_CACHE = "allocating_kv_cache"  # the paged KV pool (the dense cache grows at warm-up)
    PRELOADING_ADAPTERS = "preloading_adapters"  # preload_adapters, before warm-up: a bad id fails sooner
    WARMING_UP = "warming_up"  # one request through prefill and decode


StartProgress = Callable[[StartPhase], None]


@dataclass
class PhaseLog:
    """Passes each phase on to `report` and remembers the current one, for error messages."""

    report: StartProgress
    current: StartPhase = StartPhase.RESOLVING

    def enter(self, phase: StartPhase) -> None:
        self.current = phase
        self.report(phase)


def build_engine(settings: Settings, loaded: LoadedModel | None = None,
                 progress: StartProgress = lambda phase: None) -> AsyncEngine:
    phases = PhaseLog(progress)
    try:
        return _assemble(settings, loaded or _load(settings.model, phases), phases)
    except Exception as exc:
        if not is_out_of_memory(exc):
            raise
        raise StartupError(out_of_memory_message(exc, phases.current, settings.limits)) from exc


def build_serving_engine(settings: Settings, progress: StartProgress = lambda phase: None) -> AsyncEngine:
    """build_engine for a process that serves this one engine until it exits (the CLI, a Ray
    replica). The grammar engine's tokenizer is built in the background, and the start-up heap
    (modules, weights' wrappers, the tokenizer) is frozen out of the garbage collector: a full
    collection walked all of it, ~150-220 ms with the GIL held, and fired while serving (measured
    inside a 24-adapter cold burst: 214 ms, with every load and step stalled). Not for tests that
    build many engines: frozen objects in cycles are never freed."""
    engine = build_engine(settings, progress=progress)
    gc.collect()
    gc.freeze()
    log.info("start-up heap frozen out of the garbage collector (%d objects)", gc.get_freeze_count())
    engine.guides.prepare()  # in the background, after the freeze: serving starts without waiting for it
    return engine


def _load(config: ModelConfig, phases: PhaseLog) -> LoadedModel:
    phases.enter(StartPhase.RESOLVING)
    resolved = resolve_model_dir(config.model, on_convert=lambda: phases.enter(StartPhase.CONVERTING))
    phases.enter(StartPhase.LOADING_WEIGHTS)
    return load_model_explained(config, resolved)


def build_kv_cache(settings: Settings, loaded: LoadedModel) -> KVCache | PagedKVCache:
    """Paged on CPU (and wherever asked for); dense slots on CUDA, where decode is CUDA-graphed over
    views of them, until a paged attention kernel is in place there."""
    limits, layout = settings.limits, settings.model.kv_cache
    arch = loaded.model.config
    if layout == "dense" or (layout == "auto" and loaded.device.type == "cuda"):
        return KVCache(arch, limits.max_batch_size, limits.max_total_tokens, loaded.device, loaded.dtype,
                       limits.max_batch_total_tokens)
    # longrope sequences recompute their whole cache once (model.recomputes_at): never over shared blocks
    prefix_caching = settings.model.prefix_caching and not loaded.model.recomputes_caches
    available = available_host_memory() if loaded.device.type == "cpu" else None
    if available is not None and limits.kv_cache_memory_mb * 2**20 > available:
        raise StartupError(f"kv_cache_memory_mb ({limits.kv_cache_memory_mb}) is more than the memory available "
                           f"now ({available // 2**20} MB, after the weights): lower --kv-cache-memory-mb")
    kv = PagedKVCache.sized(arch, limits.kv_cache_memory_mb * 2**20, limits.kv_block_size, loaded.device, loaded.dtype,
                            prefix_caching)
    if kv.capacity_tokens < limits.max_total_tokens:
        raise StartupError(f"kv_cache_memory_mb ({limits.kv_cache_memory_mb}) holds {kv.capacity_tokens} tokens of "
                           f"this model, fewer than one request's max_total_tokens ({limits.max_total_tokens}): "
                           "raise kv_cache_memory_mb or lower max_total_tokens")
    log.info("paged KV cache: %d blocks of %d tokens, %d tokens in %.0f MB; prefix caching %s",
             kv.pool.num_blocks - 1, kv.block_size, kv.capacity_tokens, kv.capacity_bytes / 2**20,
             "on" if prefix_caching else "off")
    return kv


def preallocates_adapters(device: torch.device, budget_mb: int) -> bool:
    """The adapter pool is made whole ahead of the first activation: on CPU when its budget is a
    modest share of the host's free memory (a budget set high to mean "no limit" grows by
    doubling); on CUDA when the Triton kernels read each row's columns wherever they are (growing
    would re-capture every decode graph; a masked window over a whole pool would read all of it)."""
    if device.type == "cuda":
        return triton_kernels() is not None and budget_mb * 2**20 <= torch.cuda.mem_get_info(device)[0] // 2
    free = available_host_memory()
    return device.type == "cpu" and free is not None and budget_mb * 2**20 <= free // 4


def available_host_memory() -> int | None:
    """MemAvailable from /proc/meminfo (Linux), in bytes; None where it can't be read."""
    try:
        line = next(line for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemAvailable"))
        return int(line.split()[1]) * 1024
    except (OSError, StopIteration, ValueError, IndexError):
        return None


def _assemble(settings: Settings, loaded: LoadedModel, phases: PhaseLog) -> AsyncEngine:
    limits = settings.limits
    phases.enter(StartPhase.ALLOCATING_KV_CACHE)
    kv = build_kv_cache(settings, loaded)
    resident = ResidentAdapters(loaded.model, limits.max_active_adapters, limits.max_adapter_memory_mb * 2**20,
                                preallocate=preallocates_adapters(loaded.device, limits.max_adapter_memory_mb))
    budget = SchedulerBudget(limits.max_batch_size, limits.max_batch_total_tokens, limits.max_batch_prefill_tokens,
                             limits.max_queue_wait_s)
    graphs = None
    if (loaded.device.type == "cuda" and settings.model.cuda_graph_max_batch_size and loaded.model.graph_safe
            and not kv.paged):
        graphs = DecodeGraphs(loaded.model, kv, resident, settings.model.cuda_graph_max_batch_size)
    runner = ModelRunner(loaded.model, kv, resident, loaded.device, graphs)
    engine = Engine(runner, Scheduler(budget, kv, resident, loaded.model.recomputes_at), loaded.eos_token_ids)
    store = AdapterStore(store_config(settings.adapters), loaded.model.config, loaded.dtype)
    store.device_copy = resident.resident
    store.before_load = resident.make_pool
    engine.cpu = CpuThreads(torch.get_num_threads(), store.busy_loaders, enabled=loaded.device.type == "cpu")
    if settings.adapters.preload_adapters:
        phases.enter(StartPhase.PRELOADING_ADAPTERS)
        preload(store, settings.adapters.preload_adapters)
    phases.enter(StartPhase.WARMING_UP)
    resident.warm_up_kernels()
    warm_up(engine, loaded)
    guides = GuideFactory(loaded.tokenizer, loaded.eos_token_ids, limits.max_cached_schemas)
    async_engine = AsyncEngine(engine, loaded, limits, store, guides)
    engine.loads_ahead = async_engine.loads_ahead
    return async_engine


def is_out_of_memory(exc: BaseException) -> bool:
    """CUDA raises OutOfMemoryError; the CPU allocator, and a warm-up whose forward pass failed, a
    plain RuntimeError that says so."""
    text = str(exc)
    return (isinstance(exc, (torch.OutOfMemoryError, MemoryError))
            or isinstance(exc, RuntimeError) and ("can't allocate memory" in text or "out of memory" in text))


def out_of_memory_message(exc: BaseException, phase: StartPhase, limits: Limits) -> str:
    """What ran out, with torch's sizes (asked for; on CUDA also total and free), and which knob to turn."""
    detail = one_line(exc, limit=10_000)
    detail = detail[detail.find("DefaultCPUAllocator"):] if "DefaultCPUAllocator" in detail else detail
    detail = ". ".join(detail.split(". ")[:3]).rstrip(".")  # torch's allocator tuning tips follow; ours are below
    detail = _CPU_BYTES.sub(lambda m: f"{m.group(0)} ({int(m.group(1)) / 1e9:.1f} GB)", detail)
    if phase in (StartPhase.RESOLVING, StartPhase.CONVERTING, StartPhase.LOADING_WEIGHTS):
        advice = "the weights do not fit: use a smaller model or dtype (--dtype bfloat16), or free the device"
    elif phase is StartPhase.ALLOCATING_KV_CACHE:
        advice = (f"the paged KV cache is kv_cache_memory_mb ({limits.kv_cache_memory_mb}) MB: lower "
                  "--kv-cache-memory-mb, or free the device")
    else:
        advice = (f"the KV cache holds max_batch_size ({limits.max_batch_size}) sequences of up to "
                  f"max_total_tokens ({limits.max_total_tokens}) tokens: lower --max-batch-size or "
                  "--max-total-tokens, or free the device")
    return f"out of memory while {phase.value}: {detail}; {advice}"


def store_config(config: AdapterConfig) -> AdapterStoreConfig:
    return AdapterStoreConfig(
        adapters_dir=Path(config.adapters_dir),
        extra_roots=tuple(Path(r) for r in config.adapter_roots),
        s3_cache_dir=loraserve_home() / "adapters" / "s3",
        max_cpu_adapters=config.max_cpu_adapters,
        download_timeout_s=config.adapter_download_timeout_s,
    )


def preload(store: AdapterStore, adapter_ids: tuple[str, ...]) -> None:
    """Load configured adapters ("repo/1", "hub:org/name", "local:path", "s3://b/p") into the CPU
    tier before serving; a failure stops the start with the adapter's error."""
    for entry in adapter_ids:
        prefix, sep, rest = entry.partition(":")
        source, adapter_id = (prefix, rest) if sep and prefix in SOURCE_NAMES and prefix != "s3" else (None, entry)
        try:
            store.get(store.key_for(adapter_id, source)).result()
        except ServingError as exc:
            raise StartupError(f"preload_adapters entry {entry!r} failed: {exc.message}; fix or remove it "
                               "(config file or LORASERVE_PRELOAD_ADAPTERS)") from exc


def warm_up(engine: Engine, loaded: LoadedModel, new_tokens: int = 4) -> None:
    """Run one short request through prefill and decode before the engine thread starts."""
    started = time.monotonic()
    prompt = loaded.tokenizer("Hello")["input_ids"]
    # The KV cache's first block (max_batch_size slots) is allocated here, where running out of memory
    # stops the start with the sizes; inside a step it would only fail the warm-up request.
    engine.scheduler.kv.ensure_capacity(len(prompt) + new_tokens)
    errors: list[str] = []
    request = Request(
        prompt_ids=prompt,
        params=SamplingParams(),
        stop=StopCriteria(max_new_tokens=new_tokens, ignore_eos=True),
        detokenizer=IncrementalDetokenizer(loaded.tokenizer, prompt, loaded.special_token_ids),
        sink=lambda event: errors.append(event.error) if event.error else None,
    )
    engine.scheduler.add(request)
    while engine.step():
        pass
    if request.num_generated != new_tokens:
        raise RuntimeError(f"warm-up generated {request.num_generated} of {new_tokens} tokens"
                           + (f": {errors[0]}" if errors else ""))
    log.info("warm-up done in %.2f s", time.monotonic() - started)
