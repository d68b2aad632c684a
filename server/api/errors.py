"""One place that turns exceptions into each route family's error body.

Native routes answer {"error", "error_type"} (LoRAX's shape); routes under /v1 answer OpenAI's
{"error": {"message", "type", "param", "code"}}. Every error is JSON, whatever went wrong.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from server.adapters.weights import AdapterNotFoundError
from server.api.error_bodies import error_body, is_openai  # noqa: F401 (re-exported)
from server.errors import ServingError, ValidationError

log = logging.getLogger(__name__)

_HTTP_ERROR_TYPES = {400: "bad_request", 401: "unauthorized", 404: "not_found", 405: "method_not_allowed",
                     413: "payload_too_large", 415: "unsupported_media_type"}


def openai_error(exc: ServingError) -> tuple[int, str, str | int]:
    """OpenAI's status, type and code for our errors: bad parameters are 400 invalid_request_error,
    an unknown adapter (the `model`) is 404 model_not_found."""
    if isinstance(exc, AdapterNotFoundError):
        return 404, "invalid_request_error", "model_not_found"
    if isinstance(exc, ValidationError):
        return 400, "invalid_request_error", exc.status_code
    return exc.status_code, exc.error_type, exc.status_code


def error_response(request: Request, status: int, error_type: str, message: str) -> JSONResponse:
    return JSONResponse(error_body(request.url.path, status, error_type, message), status_code=status)


def describe_validation_error(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "body"
        parts.append(f"{where}: {err.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request"


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServingError)
    async def _serving(request: Request, exc: ServingError) -> JSONResponse:
        if is_openai(request.url.path):
            status, error_type, code = openai_error(exc)
            body = {"error": {"message": exc.message, "type": error_type, "param": None, "code": code}}
            return JSONResponse(body, status_code=status)
        return error_response(request, exc.status_code, exc.error_type, exc.message)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        content_type = request.headers.get("content-type", "")
        if request.method == "POST" and "json" not in content_type:
            message = f"Content-Type must be application/json; got {content_type or 'none'}"
            return error_response(request, 415, "unsupported_media_type", message)
        if is_openai(request.url.path):  # OpenAI answers malformed requests with 400
            return error_response(request, 400, "invalid_request_error", describe_validation_error(exc))
        return error_response(request, 422, "validation", describe_validation_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        error_type = _HTTP_ERROR_TYPES.get(exc.status_code, "http_error")
        if is_openai(request.url.path) and exc.status_code == 400:  # OpenAI's type for any malformed request
            error_type = "invalid_request_error"
        return error_response(request, exc.status_code, error_type, str(exc.detail))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)
        return error_response(request, 500, "internal", f"internal error: {type(exc).__name__}")
