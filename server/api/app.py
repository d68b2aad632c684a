"""FastAPI assembly: routes, error handlers, and the engine's life cycle.

The model loads on a background thread at start-up so /health can answer 503 ("loading")
until the model is loaded and a warm-up step has run, then 200.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from contextlib import asynccontextmanager
from typing import Callable, Optional, Protocol

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from server import __version__
from server.api import admin, native, openai, ui
from server.api.errors import error_body, install_error_handlers
from server.api.middleware import BearerAuth, BodySizeLimit, CancelOnDisconnect, CountRequests
from server.api.schemas import Info
from server.config import Settings
from server.control import routes as control
from server.engine.async_engine import AsyncEngine
from server.engine.builder import StartPhase, StartProgress
from server.errors import ExitCode, StartupError, one_line
from server.metrics import ENGINE_COLLECTOR, REGISTRY
from server.model.default_model import loraserve_home

log = logging.getLogger(__name__)

LoadFailureHandler = Callable[[Exception], None]


class EngineFactory(Protocol):
    def __call__(self, settings: Settings, *, progress: StartProgress) -> AsyncEngine: ...


class EngineHolder:
    """Builds the engine off the event loop, remembering which start-up phase it is in and, if
    the start fails, why; `on_failure` decides what a failure does to the process."""

    def __init__(self, settings: Settings, factory: EngineFactory, on_failure: LoadFailureHandler) -> None:
        self.settings, self.factory, self.on_failure = settings, factory, on_failure
        self.engine: Optional[AsyncEngine] = None
        self.error: Optional[str] = None
        self.phase = "starting"
        self.started_at = self.phase_started_at = time.monotonic()

    def enter(self, phase: StartPhase) -> None:
        log.info("start-up: %s (%.1f s in)", phase.value, time.monotonic() - self.started_at)
        self.phase, self.phase_started_at = phase.value, time.monotonic()

    def load(self, app: FastAPI) -> None:
        try:
            engine = self.factory(self.settings, progress=self.enter)
            engine.engine.start()
            self.engine = app.state.engine = engine
            log.info("ready: serving %s (started in %.1f s)", engine.loaded.name, time.monotonic() - self.started_at)
        except Exception as exc:  # /health says so until on_failure has ended the process
            self.error = one_line(exc, limit=2000)
            self.on_failure(exc)

    def health_details(self) -> dict:
        now = time.monotonic()
        return {"phase": self.phase, "elapsed_s": round(now - self.started_at, 1),
                "phase_elapsed_s": round(now - self.phase_started_at, 1)}


def log_load_failure(exc: Exception) -> None:
    """Without a CLI to end the process (an embedding app, a test), a failed start is logged and
    /health keeps answering 503 with the reason."""
    log.error("model failed to load: %s", one_line(exc), exc_info=not isinstance(exc, StartupError))


def kv_info(kv) -> dict:
    if kv.paged:
        return {"kv_cache": "paged", "kv_cache_tokens": kv.capacity_tokens, "kv_block_size": kv.block_size,
                "kv_cache_memory_mb": kv.capacity_bytes // 2**20}
    return {"kv_cache": "dense", "kv_cache_tokens": kv.max_slots * kv.max_tokens, "kv_block_size": 0,
            "kv_cache_memory_mb": kv.capacity_bytes // 2**20}


def engine_snapshot(holder: EngineHolder) -> dict:
    engine = holder.engine
    if engine is None:
        return {"queue_depth": 0, "running_requests": 0, "in_flight_requests": 0, "kv_slots_used": 0,
                "kv_cache_used_bytes": 0, "kv_cache_capacity_bytes": 0, "prefix_cache_blocks": 0,
                "pinned_adapters": 0, "device_adapters": 0, "cpu_adapters": 0, "adapter_events": {}}
    scheduler, store = engine.engine.scheduler, engine.store
    running = list(scheduler.running)  # the engine thread changes it; a copy is a consistent enough sample
    return {
        "queue_depth": sum(map(len, list(scheduler.queues.values()))), "running_requests": len(running),
        "in_flight_requests": engine.in_flight, "kv_slots_used": scheduler.kv.used_slots,
        "kv_cache_used_bytes": scheduler.kv.used_bytes, "kv_cache_capacity_bytes": scheduler.kv.capacity_bytes,
        "prefix_cache_blocks": scheduler.kv.cached_blocks,
        "pinned_adapters": len({id(r.adapter) for r in running if r.adapter is not None}),
        "device_adapters": len(scheduler.adapters.active),
        "cpu_adapters": len(store.cpu_resident()),
        "adapter_events": {("device", "load"): scheduler.adapters.loads,
                           ("device", "eviction"): scheduler.adapters.evictions,
                           ("cpu", "load"): store.stats["loads"], ("cpu", "hit"): store.stats["cpu_hits"],
                           ("cpu", "eviction"): store.stats["cpu_evictions"],
                           ("cpu", "from_device"): store.stats["device_hits"],
                           ("cpu", "failure"): store.stats["load_failures"]},
    }


async def exit_when_engine_dies(holder: EngineHolder, period_s: float = 1.0) -> None:
    """If the engine loop itself dies, every request already got an error and /health says 503;
    then the process exits non-zero so a supervisor (Docker, Kubernetes, systemd) restarts it."""
    while holder.engine is None or holder.engine.engine.alive:
        await asyncio.sleep(period_s)
    log.critical("engine loop died (%s): exiting for a restart", holder.engine.engine.fatal_error)
    await asyncio.sleep(period_s)  # let /health report 503 and error responses flush
    os._exit(ExitCode.ENGINE_DIED)


def unavailable(request: Request, message: str, **details) -> JSONResponse:
    """503 in the native error shape, plus what a probe or a person needs to tell loading from broken."""
    return JSONResponse({**error_body(request.url.path, 503, "unavailable", message), **details}, status_code=503)


def create_app(settings: Settings, factory: EngineFactory,
               on_load_failure: LoadFailureHandler = log_load_failure) -> FastAPI:
    """The app; its engine is built on a background thread once it starts. `on_load_failure` gets
    the exception if that fails (the CLI stops the server and exits non-zero)."""
    holder = EngineHolder(settings, factory, on_load_failure)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.engine = None
        app.state.control = control.build_control_plane(settings, loraserve_home())
        threading.Thread(target=holder.load, args=(app,), name="model-loader", daemon=True).start()
        watchdog = asyncio.create_task(exit_when_engine_dies(holder))
        runners = control.start_control_runners(app)
        yield
        watchdog.cancel()
        await runners.stop()
        if holder.engine is not None:
            holder.engine.engine.stop()
            holder.engine.store.shutdown()
        app.state.control.close()

    app = FastAPI(title="loraserve", version=__version__, lifespan=lifespan)
    app.state.holder, app.state.settings = holder, settings
    app.add_middleware(CancelOnDisconnect)
    app.add_middleware(BodySizeLimit, max_bytes=settings.http.max_request_bytes)
    app.add_middleware(CountRequests)
    if settings.http.api_keys:
        app.add_middleware(BearerAuth, keys=settings.http.api_keys)
    install_error_handlers(app)
    app.include_router(native.router)
    app.include_router(admin.router)
    control.include_control_routers(app)
    app.include_router(openai.router)
    app.include_router(ui.router)

    ENGINE_COLLECTOR.snapshot = lambda: engine_snapshot(holder)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)

    @app.get("/health")
    async def health(request: Request) -> JSONResponse:
        if holder.error is not None:
            return unavailable(request, f"model failed to load: {holder.error}", status="failed",
                               phase=holder.phase)
        if holder.engine is None:
            details = holder.health_details()
            message = f"the model is still loading ({details['phase']}, {details['elapsed_s']:.0f} s so far)"
            return unavailable(request, message, status="loading", **details)
        if not holder.engine.engine.alive:
            return unavailable(request, "the engine has stopped", status="stopped")
        return JSONResponse({"status": "ok"})

    @app.get("/info", response_model=Info)
    async def info(request: Request) -> Info:
        engine = native.engine_of(request)
        limits = settings.limits
        return Info(
            model_id=engine.loaded.name,
            model_dtype=str(engine.loaded.dtype).removeprefix("torch."),
            model_device_type=engine.loaded.device.type,
            version=__version__,
            **kv_info(engine.engine.scheduler.kv),
            **{k: getattr(limits, k) for k in Info.model_fields if hasattr(limits, k) and not k.startswith("kv_")},
        )

    return app
