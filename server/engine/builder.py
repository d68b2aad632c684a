"""Assemble model, KV cache, scheduler, runner and engine from Settings, and warm them up."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from server.adapters.lora import ResidentAdapters
from server.adapters.store import SOURCE_NAMES, AdapterStore, AdapterStoreConfig
from server.config import AdapterConfig, Settings
from server.engine.async_engine import AsyncEngine
from server.engine.cuda_graphs import DecodeGraphs
from server.engine.detokenizer import IncrementalDetokenizer
from server.engine.engine import Engine
from server.engine.kv_cache import KVCache
from server.engine.request import Request, SamplingParams, StopCriteria
from server.engine.runner import ModelRunner
from server.engine.scheduler import Scheduler, SchedulerBudget
from server.model.default_model import loraserve_home
from server.model.loader import LoadedModel, load_model
from server.structured.guide import GuideFactory

log = logging.getLogger(__name__)


def build_engine(settings: Settings, loaded: LoadedModel | None = None) -> AsyncEngine:
    loaded = loaded or load_model(settings.model)
    limits = settings.limits
    kv = KVCache(loaded.model.config, limits.max_batch_size, limits.max_total_tokens, loaded.device, loaded.dtype)
    resident = ResidentAdapters(loaded.model, limits.max_active_adapters, limits.max_adapter_memory_mb * 2**20)
    budget = SchedulerBudget(limits.max_batch_size, limits.max_batch_total_tokens, limits.max_batch_prefill_tokens,
                             limits.max_queue_wait_s)
    graphs = None
    if loaded.device.type == "cuda" and settings.model.cuda_graph_max_batch_size and loaded.model.graph_safe:
        graphs = DecodeGraphs(loaded.model, kv, resident, settings.model.cuda_graph_max_batch_size)
    runner = ModelRunner(loaded.model, kv, resident, loaded.device, graphs)
    engine = Engine(runner, Scheduler(budget, kv, resident), loaded.eos_token_ids)
    warm_up(engine, loaded)
    store = AdapterStore(store_config(settings.adapters), loaded.model.config)
    preload(store, settings.adapters.preload_adapters)
    guides = GuideFactory(loaded.tokenizer, loaded.eos_token_ids, limits.max_cached_schemas)
    return AsyncEngine(engine, loaded, limits, store, guides)


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
        store.get(store.key_for(adapter_id, source)).result()


def warm_up(engine: Engine, loaded: LoadedModel, new_tokens: int = 4) -> None:
    """Run one short request through prefill and decode before the engine thread starts."""
    started = time.monotonic()
    prompt = loaded.tokenizer("Hello")["input_ids"]
    request = Request(
        prompt_ids=prompt,
        params=SamplingParams(),
        stop=StopCriteria(max_new_tokens=new_tokens, ignore_eos=True),
        detokenizer=IncrementalDetokenizer(loaded.tokenizer, prompt, loaded.special_token_ids),
        sink=lambda event: None,
    )
    engine.scheduler.add(request)
    while engine.step():
        pass
    if request.num_generated != new_tokens:
        raise RuntimeError(f"warm-up generated {request.num_generated} of {new_tokens} tokens")
    log.info("warm-up done in %.2f s", time.monotonic() - started)
