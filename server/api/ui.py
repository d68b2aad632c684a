"""The web playground: one static page (`static/ui.html`, no build step, nothing fetched from elsewhere)
at GET /ui, and at GET / for a browser asking for HTML. The page holds no data: it is served without an
API key, and every API call it makes sends the key the user typed as its bearer token."""

from __future__ import annotations

import base64
import hashlib
import re
from functools import cache
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

router = APIRouter(include_in_schema=False)
PAGE = Path(__file__).with_name("static") / "ui.html"


def wants_html(accept: str) -> bool:
    return "text/html" in accept.lower()


def is_page_request(scope: dict) -> bool:
    """The requests answered with the static page, which BearerAuth lets through without a key."""
    path, method = scope["path"], scope["method"]
    if path == "/ui":
        return method in ("GET", "HEAD")
    accept = dict(scope["headers"]).get(b"accept", b"").decode("latin-1")
    return path == "/" and method == "GET" and wants_html(accept)


@cache
def page() -> tuple[bytes, dict[str, str]]:
    """The page and its headers. The Content-Security-Policy allows only this page's own inline script
    and style (by hash) and requests to this server: no CDN, and injected markup could run nothing."""
    html = PAGE.read_text(encoding="utf-8")

    def hashes(tag: str) -> str:
        bodies = re.findall(rf"<{tag}>(.*?)</{tag}>", html, flags=re.S)
        return " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(b.encode()).digest()).decode()}'" for b in bodies)

    csp = (f"default-src 'none'; script-src {hashes('script')}; style-src {hashes('style')}; "
           "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
    return html.encode(), {"content-security-policy": csp, "cache-control": "no-cache", "vary": "Accept",
                           "x-content-type-options": "nosniff", "referrer-policy": "no-referrer"}


def page_response() -> Response:
    body, headers = page()
    return Response(body, media_type="text/html; charset=utf-8", headers=headers)


@router.api_route("/ui", methods=["GET", "HEAD"])
async def ui() -> Response:
    return page_response()


@router.get("/")
async def root(request: Request) -> Response:
    """A browser opening the server's address gets the page; any other GET / gets the 405 it always
    got (POST / is lorax-client's generate route, in native.py)."""
    if wants_html(request.headers.get("accept", "")):
        return page_response()
    raise StarletteHTTPException(405)
