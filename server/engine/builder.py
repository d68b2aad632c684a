"""Assemble model, KV cache, scheduler, runner and engine from Settings, and warm them up."""

from __future__ import annotations

import logging
import time

from server.config import Settings
from server.engine.async_engine import AsyncEngine
from server.engine.detokenizer import IncrementalDetokenizer
from server.engine.engine import Engine
from server.engine.kv_cache import KVCache
from server.engine.request import Request, SamplingParams, StopCriteria
from server.engine.runner import ModelRunner
from server.engine.scheduler import Scheduler, SchedulerBudget
from server.model.loader import LoadedModel, load_model

log = logging.getLogger(__name__)


def build_engine(settings: Settings, loaded: LoadedModel | None = None) -> AsyncEngine:
    loaded = loaded or load_model(settings.model)
    limits = settings.limits
    kv = KVCache(loaded.model.config, limits.max_batch_size, limits.max_total_tokens, loaded.device, loaded.dtype)
    budget = SchedulerBudget(limits.max_batch_size, limits.max_batch_total_tokens, limits.max_batch_prefill_tokens)
    engine = Engine(ModelRunner(loaded.model, kv, loaded.device), Scheduler(budget, kv), loaded.eos_token_ids)
    warm_up(engine, loaded)
    return AsyncEngine(engine, loaded, limits)


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
