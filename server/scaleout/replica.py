"""The engine replica: the unchanged app (`create_app`) running in-process on one Ray Serve replica.

`@serve.multiplexed` is only a routing hint here: it tells Serve's router which adapters this replica
has served, so their next requests come back. Dropping an id from Serve's LRU unloads nothing: the
engine's own tiers (device slots, CPU LRU) keep managing memory.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import AsyncIterator, Union

from prometheus_client import start_http_server
from ray import serve

from server import metrics
from server.api.app import create_app
from server.config import Settings
from server.engine.builder import build_serving_engine
from server.scaleout import registry
from server.scaleout.asgi_call import HttpCall, ResponseStart, run_asgi

log = logging.getLogger(__name__)
HINTED_ADAPTERS = 64  # adapter ids a replica is remembered for (Serve's LRU); the engine's tiers are separate
LOAD_TIMEOUT_S = 900.0


class AdapterHint(str):
    """What Serve's multiplexer keeps per adapter: just the id, with nothing to unload (no __del__)."""


@serve.deployment(name="EngineReplica", max_ongoing_requests=8, health_check_period_s=5, health_check_timeout_s=10,
                  graceful_shutdown_timeout_s=30)
class EngineReplica:
    async def __init__(self, settings: Settings) -> None:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        context = serve.get_replica_context()
        self.replica_id = context.replica_id.unique_id
        self.app = create_app(settings, build_serving_engine)
        self.lifespan = self.app.router.lifespan_context(self.app)
        await self.lifespan.__aenter__()
        await self._wait_until_loaded()
        self.metrics_url = self._serve_metrics()
        registry.announce(context.app_name, self.replica_id, {"pid": os.getpid(), "metrics_url": self.metrics_url})

    async def _wait_until_loaded(self) -> None:
        holder, deadline = self.app.state.holder, time.monotonic() + LOAD_TIMEOUT_S
        while holder.engine is None:
            if holder.error is not None:
                raise RuntimeError(f"model failed to load: {holder.error}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"model still not loaded after {LOAD_TIMEOUT_S:.0f} s ({holder.phase})")
            await asyncio.sleep(0.2)

    def _serve_metrics(self) -> str:
        """This replica's own Prometheus registry (the same metrics as a single server's /metrics) on a
        port of its own; the gateway lists the address and proxies it (/replicas/{id}/metrics)."""
        host = os.environ.get("LORASERVE_RAY_METRICS_HOST") or _node_ip()
        server, _ = start_http_server(0, addr=host, registry=metrics.REGISTRY)
        return f"http://{host}:{server.server_port}/metrics"

    @serve.multiplexed(max_num_models_per_replica=HINTED_ADAPTERS)
    async def hint(self, adapter_id: str) -> AdapterHint:
        return AdapterHint(adapter_id)  # the engine loads the adapter itself, as it would on one server

    async def handle(self, call: HttpCall) -> AsyncIterator[Union[ResponseStart, bytes]]:
        adapter_id = serve.get_multiplexed_model_id()
        if adapter_id:
            await self.hint(adapter_id)
        async for part in run_asgi(self.app, call, self.replica_id):
            yield part

    async def model_name(self) -> str:
        return self.app.state.engine.loaded.name

    async def check_health(self) -> None:
        engine = self.app.state.holder.engine
        if engine is None or not engine.engine.alive:
            raise RuntimeError("the engine loop has stopped")

    async def __del__(self) -> None:
        await self.lifespan.__aexit__(None, None, None)


def _node_ip() -> str:
    import ray

    return ray.util.get_node_ip_address()
