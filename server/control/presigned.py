"""Pre-signed URLs: `/v2/_blobs/{token}`, where the unguessable, single-use, expiring token is the
authorisation (the SDK fetches them with plain `requests`, no Authorization header). A PUT streams
its body to one target file under its own size cap; a GET streams one file back.
"""

from __future__ import annotations

import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, JSONResponse

from server.errors import NotFoundError, PayloadTooLargeError, ServingError

BLOB_PREFIX = "/v2/_blobs/"
DEFAULT_TTL_S = 3600.0
router = APIRouter(tags=["control"], include_in_schema=False)


class GoneError(ServingError):
    """The token existed but can't be used any more (spent or expired)."""

    error_type = "gone"
    status_code = 410


@dataclass(frozen=True)
class Blob:
    method: str  # "PUT": write `path`; "GET": read it
    path: Path
    expires_at: float
    download_name: Optional[str] = None


class BlobRegistry:
    """The live tokens, in memory: a restart voids them all (an hour-long URL loses nothing that
    the SDK would not simply ask for again)."""

    def __init__(self, max_upload_bytes: int, ttl_s: float = DEFAULT_TTL_S) -> None:
        self.max_upload_bytes, self.ttl_s = max_upload_bytes, ttl_s
        self._live: dict[str, Blob] = {}
        self._dead: dict[str, str] = {}  # token -> why it can't be used ("used" | "expired")
        self._lock = threading.Lock()

    def issue(self, base_url: str, method: str, path: Path, download_name: Optional[str] = None) -> str:
        """An absolute URL that lets one request `method` the file at `path`."""
        token = secrets.token_urlsafe(32)
        with self._lock:
            self._prune()
            self._live[token] = Blob(method, path, time.monotonic() + self.ttl_s, download_name)
        return f"{base_url.rstrip('/')}{BLOB_PREFIX}{token}"

    def take(self, token: str, method: str) -> Blob:
        """Spend the token (a second use is refused even if the first failed half-way)."""
        with self._lock:
            blob = self._live.get(token)
            if blob is None or blob.method != method:
                if token in self._dead:
                    raise GoneError(f"this pre-signed URL has {self._dead[token]}: ask for a new one")
                raise NotFoundError("unknown pre-signed URL")
            del self._live[token]
            if blob.expires_at < time.monotonic():
                self._dead[token] = "expired"
                raise GoneError("this pre-signed URL has expired: ask for a new one")
            self._dead[token] = "already been used"
            return blob

    def revoke(self, url: str) -> None:
        """Void a URL not used yet (its upload was completed without it)."""
        token = url.rsplit("/", 1)[-1]
        with self._lock:
            if self._live.pop(token, None) is not None:
                self._dead[token] = "been withdrawn"

    def _prune(self) -> None:
        """Forget expired tokens an hour after expiry (410 until then, 404 after)."""
        now = time.monotonic()
        for token, blob in list(self._live.items()):
            if blob.expires_at < now:
                del self._live[token]
                self._dead[token] = "expired"
        if len(self._dead) > 10_000:  # a bound on memory; old answers turn from 410 into 404
            self._dead.clear()


def registry_of(request: Request) -> BlobRegistry:
    return request.app.state.control.blobs


@router.put(BLOB_PREFIX + "{token}")
async def put_blob(token: str, request: Request) -> JSONResponse:
    registry = registry_of(request)
    blob = registry.take(token, "PUT")
    size = await stream_to_file(request, blob.path, registry.max_upload_bytes)
    return JSONResponse({"size": size})


@router.get(BLOB_PREFIX + "{token}")
async def get_blob(token: str, request: Request) -> FileResponse:
    blob = registry_of(request).take(token, "GET")
    if not blob.path.is_file():
        raise NotFoundError("the file behind this URL no longer exists")
    return FileResponse(blob.path, filename=blob.download_name or blob.path.name)


async def stream_to_file(request: Request, path: Path, max_bytes: int) -> int:
    """Write the body chunk by chunk (never whole in memory); over `max_bytes` the partial file
    is removed and the answer is 413."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise PayloadTooLargeError(_too_large(max_bytes))
    path.parent.mkdir(parents=True, exist_ok=True)
    size = 0
    try:
        with open(path, "wb") as out:
            async for chunk in request.stream():
                size += len(chunk)
                if size > max_bytes:
                    raise PayloadTooLargeError(_too_large(max_bytes))
                out.write(chunk)
    except BaseException:  # too large, or the client went away: keep no partial file
        path.unlink(missing_ok=True)
        raise
    return size


def _too_large(max_bytes: int) -> str:
    return f"upload is larger than max_upload_mb ({max_bytes // 2**20} MB)"


def streams_to_disk(path: str) -> bool:
    """Uploads that stream to disk under `max_upload_mb` rather than the small-body limit: pre-signed
    PUTs and OpenAI's multipart `/v1/files`."""
    return is_blob_path(path) or path == "/v1/files"


def is_blob_path(path: str) -> bool:
    """The routes whose token is their authorisation (BearerAuth and BodySizeLimit let them by)."""
    return path.startswith(BLOB_PREFIX)
