"""The ASGI layers around every route: API keys, body size, request ids and counts, and cancelling a
request whose client went away. Light on purpose (no engine, no torch): the scale-out gateway
(server/scaleout/gateway.py) puts the same auth and body limits in front of its replicas."""

from __future__ import annotations

import asyncio
import hmac
import re
import uuid
from typing import Optional

from fastapi.responses import JSONResponse

from server.api import ui
from server.api.error_bodies import error_body, is_openai
from server.control.presigned import is_blob_path, streams_to_disk
from server.logs import REQUEST_ID
from server.metrics import HTTP_REQUESTS

_SANE_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


class BodySizeLimit:
    """Reads request bodies up to `max_bytes` and answers 413 (JSON, route-family shape) beyond."""

    def __init__(self, app, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH") or streams_to_disk(scope["path"]):
            return await self.app(scope, receive, send)  # an upload streams to disk under its own cap
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
        return bearer_key_ok(scope, self.keys)


def bearer_key_ok(scope, keys: list[bytes]) -> bool:
    """Whether an HTTP or WebSocket scope carries `Authorization: Bearer <one of keys>`."""
    header = dict(scope["headers"]).get(b"authorization", b"")
    scheme, _, token = header.partition(b" ")
    matches = [hmac.compare_digest(token.strip(), key) for key in keys]
    return scheme.lower() == b"bearer" and any(matches)


class CountRequests:
    """Gives each request an id (the caller's x-request-id if sane, else a new one) for logs and the
    response header, and counts responses by route template and status for /metrics."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = {"response": False}
        incoming = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        request_id = incoming if _SANE_ID.match(incoming) else uuid.uuid4().hex
        REQUEST_ID.set(request_id)

        def count(code: int) -> None:
            HTTP_REQUESTS.labels(getattr(scope.get("route"), "path", "unmatched"), str(code)).inc()

        async def remember(message) -> None:
            if message["type"] == "http.response.start":
                # counted before the client can see the response, so a scrape it sends next includes it
                started["response"] = True
                count(message["status"])
                message = {**message, "headers": [*message.get("headers", []),
                                                  (b"x-request-id", request_id.encode())]}
            await send(message)

        try:
            await self.app(scope, receive, remember)
        finally:
            if not started["response"]:  # failed before answering: the server's 500
                count(500)
