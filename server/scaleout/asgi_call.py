"""One HTTP request carried from the gateway to a replica, and the replica side that runs it through
the app in-process as ASGI, yielding the response as it is produced. No Ray here."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import AsyncIterator, Union

log = logging.getLogger(__name__)
Headers = list[tuple[bytes, bytes]]


@dataclass(frozen=True)
class HttpCall:
    method: str
    path: str
    query_string: bytes = b""
    headers: Headers = field(default_factory=list)
    body: bytes = b""
    client: tuple[str, int] = ("127.0.0.1", 0)

    def scope(self) -> dict:
        return {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
                "method": self.method, "scheme": "http", "path": self.path, "raw_path": self.path.encode(),
                "root_path": "", "query_string": self.query_string, "headers": self.headers,
                "client": self.client, "server": ("replica", 0)}


@dataclass(frozen=True)
class ResponseStart:
    """The first thing a replica yields; body chunks (bytes) follow."""

    status: int
    headers: Headers
    replica: str

    @property
    def is_stream(self) -> bool:
        content_type = dict(self.headers).get(b"content-type", b"")
        return content_type.startswith(b"text/event-stream")


async def run_asgi(app, call: HttpCall, replica: str) -> AsyncIterator[Union[ResponseStart, bytes]]:
    """Runs `call` through `app`; closing this generator early (the gateway's client went away) tells
    the app its client disconnected, which cancels the generation (CancelOnDisconnect, or SSE's own
    disconnect handling)."""
    messages: asyncio.Queue = asyncio.Queue()
    gone = asyncio.Event()
    pending_body = [call.body]

    async def receive() -> dict:
        if pending_body:
            return {"type": "http.request", "body": pending_body.pop(), "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    task = asyncio.create_task(app(call.scope(), receive, messages.put))
    task.add_done_callback(lambda _: messages.put_nowait(None))
    try:
        while (message := await messages.get()) is not None:
            if message["type"] == "http.response.start":
                yield ResponseStart(message["status"], list(message.get("headers", [])), replica)
            elif message["type"] == "http.response.body":
                if message.get("body"):
                    yield message["body"]
                if not message.get("more_body", False):
                    return
    finally:
        gone.set()
        asyncio.get_running_loop().create_task(_finish(task))  # never block a cancelled caller


async def _finish(task: asyncio.Task, grace_s: float = 10.0) -> None:
    """Lets the app end on the disconnect (it cancels its engine requests), then stops it."""
    try:
        await asyncio.wait_for(task, grace_s)
    except asyncio.TimeoutError:
        log.warning("a request did not end %.0f s after its client went away; cancelled", grace_s)
    except Exception:  # Starlette has already logged it and sent a 500
        log.debug("request ended with an exception", exc_info=True)
