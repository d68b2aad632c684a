"""FastAPI assembly: routes, error handlers, and the engine's life cycle.

The model loads on a background thread at start-up so /health can answer 503 ("loading")
until the model is loaded and a warm-up step has run, then 200.
"""

from __future__ import annotations

import logging
import threading
from contextlib import asynccontextmanager
from typing import Callable, Optional

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from server import __version__
from server.api import admin, native
from server.api.errors import error_response, install_error_handlers
from server.api.schemas import Info
from server.config import Settings
from server.engine.async_engine import AsyncEngine

log = logging.getLogger(__name__)

EngineFactory = Callable[[Settings], AsyncEngine]


class EngineHolder:
    """Builds the engine off the event loop and remembers why it failed, if it did."""

    def __init__(self, settings: Settings, factory: EngineFactory) -> None:
        self.settings, self.factory = settings, factory
        self.engine: Optional[AsyncEngine] = None
        self.error: Optional[str] = None

    def load(self, app: FastAPI) -> None:
        try:
            engine = self.factory(self.settings)
            engine.engine.start()
            self.engine = app.state.engine = engine
            log.info("ready: serving %s", engine.loaded.name)
        except Exception as exc:  # reported on /health; the supervisor decides what to do
            log.exception("model failed to load")
            self.error = f"{type(exc).__name__}: {exc}"


def create_app(settings: Settings, factory: EngineFactory) -> FastAPI:
    holder = EngineHolder(settings, factory)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.engine = None
        threading.Thread(target=holder.load, args=(app,), name="model-loader", daemon=True).start()
        yield
        if holder.engine is not None:
            holder.engine.engine.stop()

    app = FastAPI(title="loraserve", version=__version__, lifespan=lifespan)
    app.state.holder = holder
    install_error_handlers(app)
    app.include_router(native.router)
    app.include_router(admin.router)

    @app.get("/health")
    async def health(request: Request) -> JSONResponse:
        if holder.error is not None:
            return error_response(request, 503, "unavailable", f"model failed to load: {holder.error}")
        if holder.engine is None:
            return error_response(request, 503, "unavailable", "the model is still loading")
        if not holder.engine.engine.alive:
            return error_response(request, 503, "unavailable", "the engine has stopped")
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
            **{k: getattr(limits, k) for k in Info.model_fields if hasattr(limits, k)},
        )

    return app
