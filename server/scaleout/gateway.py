"""The gateway: a small FastAPI ingress in front of the engine replicas. It checks API keys and body
sizes, reads the adapter from the body (routing.py) and calls a replica through a handle with that
adapter as the multiplexed id, so each adapter's requests go where it is already loaded.

A replica that dies is survived: a generation not yet answered runs again on another replica; a
stream already started ends with loraserve's `unavailable` error event, never a bare cut.
"""

# no `from __future__ import annotations`: FastAPI reads the routes' annotations from the pickled class
import json
import logging
from typing import AsyncIterator, Optional

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError
from ray.serve.handle import DeploymentHandle

from server.api.error_bodies import error_body
from server.api.middleware import BearerAuth, BodySizeLimit
from server.config import HttpConfig
from server.scaleout import registry
from server.scaleout.asgi_call import HttpCall, ResponseStart
from server.scaleout.routing import adapter_of, is_generation

log = logging.getLogger(__name__)
REPLICA_HEADER = "x-loraserve-replica"
ATTEMPTS = 3  # one replica dying must not fail a request; a whole deployment down still does
REPLICA_GONE = (ActorDiedError, ActorUnavailableError, RayActorError, ReplicaUnavailableError,
                DeploymentUnavailableError)
_HOP_BY_HOP = {b"host", b"content-length", b"connection", b"transfer-encoding", b"keep-alive"}
_FROM_PROXY = {b"x-request-id", b"server", b"date"}  # Serve's proxy adds its own (it also passes the id on)

api = FastAPI(title="loraserve gateway", docs_url=None, redoc_url=None, openapi_url=None)


def _headers(start: ResponseStart) -> dict[str, str]:
    headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in start.headers
               if k not in _HOP_BY_HOP and k not in _FROM_PROXY}
    return {**headers, REPLICA_HEADER: start.replica}


def _streaming(start: ResponseStart, stream, path: str) -> StreamingResponse:
    async def relay() -> AsyncIterator[bytes]:
        try:
            async for chunk in stream:
                yield chunk
        except REPLICA_GONE as exc:
            log.warning("replica gone during a stream on %s: %s", path, exc)
            event = error_body(path, 503, "unavailable", "the replica serving this stream stopped; retry the request")
            yield b"data: " + json.dumps(event).encode() + b"\n\n"
        finally:
            stream.cancel()  # no-op once finished; stops the generation when the client left

    headers = _headers(start)
    media_type = headers.pop("content-type", "text/event-stream")
    return StreamingResponse(relay(), start.status, headers=headers, media_type=media_type)


def _error(path: str, status: int, error_type: str, message: str) -> JSONResponse:
    return JSONResponse(error_body(path, status, error_type, message), status_code=status)


def with_limits(app, http: HttpConfig):
    """Auth and body limits at the door: the same layers (and answers) as a single server's."""
    app = BodySizeLimit(app, max_bytes=http.max_request_bytes)
    return BearerAuth(app, keys=http.api_keys) if http.api_keys else app


# Serve pickles the class when it is decorated: everything it calls must be defined above it.
@serve.deployment(name="Gateway", max_ongoing_requests=1000, ray_actor_options={"num_cpus": 0})
@serve.ingress(api)
class Gateway:
    def __init__(self, engine: DeploymentHandle, http: HttpConfig) -> None:
        self.engine, self.http = engine, http
        self.base_names: Optional[set[str]] = None
        context = serve.get_replica_context()
        self.app_name, self.engine_name = context.app_name, "EngineReplica"

    def _set_asgi_app(self, app) -> None:
        """Serve's hook that installs the ingress app (ray/serve/_private/http_util.py), called after
        __init__ with its own frozen copy of `api`: our auth and body-limit layers go around that copy."""
        super()._set_asgi_app(with_limits(app, self.http))

    # -- routes -----------------------------------------------------------------------------------
    @api.get("/v2/deployments")
    async def list_deployments(self, request: Request) -> Response:
        return await self._with_replicas(request, lambda body: body.get("data", []))

    @api.get("/v2/deployments/{name}")
    async def get_deployment(self, name: str, request: Request) -> Response:
        return await self._with_replicas(request, lambda body: [body.get("data", {})])

    @api.get("/replicas/{replica_id}/metrics")
    async def replica_metrics(self, replica_id: str) -> Response:
        url = registry.lookup(self.app_name, replica_id).get("metrics_url")
        if not url:
            return JSONResponse(error_body("/replicas", 404, "not_found", f"no replica {replica_id!r}"), 404)
        async with httpx.AsyncClient(timeout=10) as client:
            scraped = await client.get(url)
        return Response(scraped.content, scraped.status_code, media_type=scraped.headers.get("content-type"))

    @api.api_route("/{path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"])
    async def forward(self, request: Request) -> Response:
        call = await self._call_of(request)
        adapter = adapter_of(call.method, call.path, call.body, await self._base_names(call))
        return await self._answer(call, adapter or "")

    # -- forwarding -------------------------------------------------------------------------------
    async def _call_of(self, request: Request) -> HttpCall:
        headers = [(k, v) for k, v in request.scope["headers"] if k not in _HOP_BY_HOP]
        client = request.scope.get("client") or ("unknown", 0)
        return HttpCall(request.method, request.url.path, request.scope.get("query_string", b""), headers,
                        await request.body(), tuple(client))

    async def _answer(self, call: HttpCall, adapter: str) -> Response:
        retry = is_generation(call.method, call.path) or call.method == "GET"
        for attempt in range(ATTEMPTS if retry else 1):
            stream = self.engine.options(multiplexed_model_id=adapter, stream=True).handle.remote(call)
            try:
                start: ResponseStart = await stream.__anext__()
                if start.is_stream:
                    return _streaming(start, stream, call.path)
                body = b"".join([chunk async for chunk in stream])
                return Response(body, start.status, headers=_headers(start))
            except REPLICA_GONE as exc:
                log.warning("replica gone during %s %s (attempt %d): %s", call.method, call.path, attempt + 1, exc)
            except BackPressureError:
                return _error(call.path, 429, "overloaded", "every replica is at its queue limit; retry later")
            except BaseException:
                stream.cancel()  # the client went away (or a bug): the replica stops generating
                raise
        return _error(call.path, 503, "unavailable", "no replica could answer; retry later")

    async def _base_names(self, call: HttpCall) -> set[str]:
        """The base model's name (the OpenAI `model` that means no adapter), asked of a replica once."""
        if self.base_names is None and "/v1/" in call.path:
            self.base_names = {await self.engine.model_name.remote()}
        return self.base_names or set()

    async def _with_replicas(self, request: Request, entries) -> Response:
        """The replica's answer, with the deployment's live replica count and the replicas listed."""
        call = await self._call_of(request)
        response = await self._answer(call, "")
        if response.status_code != 200:
            return response
        body, replicas = json.loads(response.body), await self._replicas()
        for entry in entries(body):
            entry["currentReplicas"] = sum(r["state"] == "RUNNING" for r in replicas)
            entry["replicas"] = replicas
        return JSONResponse(body, headers={k: v for k, v in response.headers.items() if k == REPLICA_HEADER})

    async def _replicas(self) -> list[dict]:
        controller = serve.context._get_global_client()._controller
        details = await controller.get_serve_instance_details.remote()
        deployment = details["applications"][self.app_name]["deployments"][self.engine_name]
        return [{"id": r["replica_id"], "state": r["state"], "node_ip": r.get("node_ip"), "pid": r.get("pid"),
                 "metrics_url": registry.lookup(self.app_name, r["replica_id"]).get("metrics_url")}
                for r in deployment["replicas"]]
