"""FastAPI assembly: routes, error handlers, and the engine's life cycle.

The model loads on a background thread at start-up so /health can answer 503 ("loading")
until the model is loaded and a warm-up step has run, then 200.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import re
import threading
import time
import uuid
from contextlib import asynccontextmanager
from typing import Callable, Optional, Protocol

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from server import __version__
from server.api import admin, native, openai, ui
from server.api.errors import error_body, install_error_handlers, is_openai
from server.api.schemas import Info
from server.config import Settings
from server.control.presigned import is_blob_path
from server.control.routes import build_control_plane, include_control_routers
from server.engine.async_engine import AsyncEngine
from server.engine.builder import StartPhase, StartProgress
from server.errors import ExitCode, StartupError, one_line
from server.logs import REQUEST_ID
from server.metrics import ENGINE_COLLECTOR, HTTP_REQUESTS, REGISTRY
from server.model.default_model import loraserve_home

log = logging.getLogger(__name__)

LoadFailureHandler = Callable[[Exception], None]
_SANE_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


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


class BodySizeLimit:
    """Reads request bodies up to `max_bytes` and answers 413 (JSON, route-family shape) beyond."""

    def __init__(self, app, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH") or is_blob_path(scope["path"]):
            return await self.app(scope, receive, send)  # a pre-signed upload streams under its own cap
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await self._too_large(scope, receive, send)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > self.max_bytes:
                return await self._too_large(scope, receive, send)
        body = b"".join(chunks)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _too_large(self, scope, receive, send) -> None:
        body = error_body(scope["path"], 413, "payload_too_large",
                          f"request body is larger than max_request_bytes ({self.max_bytes})")
        await JSONResponse(body, status_code=413)(scope, receive, send)


class CancelOnDisconnect:
    """Cancels a request whose client went away before its response started, so its sequence leaves
    the batch and frees its KV slot and adapter pin instead of generating for nobody (uvicorn never
    cancels a route by itself). Once a response streams, the route's own disconnect handling (SSE)
    takes over: it is handed the disconnect this layer watched for."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        body = await _read_body(receive)
        if body is None:
            return  # gone before it finished sending the request
        gone = asyncio.Event()
        started = False

        async def app_receive():
            nonlocal body
            if body is not None:
                message, body = {"type": "http.request", "body": body, "more_body": False}, None
                return message
            await gone.wait()
            return {"type": "http.disconnect"}

        async def app_send(message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        await self._run(scope, receive, send, app_receive, app_send, gone, lambda: started)

    async def _run(self, scope, receive, send, app_receive, app_send, gone: asyncio.Event, started) -> None:
        app = asyncio.create_task(self.app(scope, app_receive, app_send))
        watcher = asyncio.create_task(_wait_for_disconnect(receive))
        await asyncio.wait({app, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if app.done():
            watcher.cancel()
            return app.result()
        gone.set()
        if not started():
            app.cancel()
        try:
            await app
        except asyncio.CancelledError:
            if not app.cancelled():
                raise  # this layer itself was cancelled (server shutdown)
        if not started():  # nginx's "client closed request": for the access log and /metrics, never sent
            await JSONResponse(error_body(scope["path"], 499, "client_closed", "client disconnected"),
                               status_code=499)(scope, receive, send)


async def _read_body(receive) -> Optional[bytes]:
    chunks, more = [], True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunks.append(message.get("body", b""))
        more = message.get("more_body", False)
    return b"".join(chunks)


async def _wait_for_disconnect(receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


class BearerAuth:
    """Every route but /health, the static page (ui.py: it holds no data) and pre-signed URLs needs `Authorization:
    Bearer <one of the keys>` (compared in constant time, against every key, so timing says nothing
    about which or how much matched)."""

    def __init__(self, app, keys: tuple[str, ...]) -> None:
        self.app, self.keys = app, [k.encode() for k in keys]

    async def __call__(self, scope, receive, send) -> None:
        if (scope["type"] != "http" or scope["path"] == "/health" or ui.is_page_request(scope)
                or is_blob_path(scope["path"]) or self._allowed(scope)):  # a pre-signed URL's token is its key
            return await self.app(scope, receive, send)
        error_type = "authentication_error" if is_openai(scope["path"]) else "unauthorized"
        body = error_body(scope["path"], 401, error_type, "missing or invalid API key (Authorization: Bearer ...)")
        await JSONResponse(body, status_code=401, headers={"www-authenticate": "Bearer"})(scope, receive, send)

    def _allowed(self, scope) -> bool:
        header = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, token = header.partition(b" ")
        matches = [hmac.compare_digest(token.strip(), key) for key in self.keys]
        return scheme.lower() == b"bearer" and any(matches)


class CountRequests:
    """Gives each request an id (the caller's x-request-id if sane, else a new one) for logs and the
    response header, and counts responses by route template and status for /metrics."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = {"code": 500}
        incoming = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        request_id = incoming if _SANE_ID.match(incoming) else uuid.uuid4().hex
        REQUEST_ID.set(request_id)

        async def remember(message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                message = {**message, "headers": [*message.get("headers", []),
                                                  (b"x-request-id", request_id.encode())]}
            await send(message)

        try:
            await self.app(scope, receive, remember)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            HTTP_REQUESTS.labels(route, str(status["code"])).inc()


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
        app.state.control = build_control_plane(settings, loraserve_home())
        threading.Thread(target=holder.load, args=(app,), name="model-loader", daemon=True).start()
        watchdog = asyncio.create_task(exit_when_engine_dies(holder))
        yield
        watchdog.cancel()
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
    include_control_routers(app)
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
