"""Errors raised below the HTTP layer, each with a stable error_type; server.api.errors maps them
to each route family's status code and body shape."""

from __future__ import annotations

from enum import IntEnum


class ServingError(Exception):
    error_type = "internal"
    status_code = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ValidationError(ServingError):
    """The request is malformed or can never fit the configured budgets."""

    error_type = "validation"
    status_code = 422


class BadRequestError(ServingError):
    """A control-plane request that can't be honoured as asked (wrong base model, dataset not ready)."""

    error_type = "bad_request"
    status_code = 400


class ForbiddenError(ServingError):
    error_type = "forbidden"
    status_code = 403


class ConflictError(ServingError):
    """The name is taken, or the thing is busy (a repo with a job running)."""

    error_type = "conflict"
    status_code = 409


class NotFoundError(ServingError):
    error_type = "not_found"
    status_code = 404


class PayloadTooLargeError(ServingError):
    error_type = "payload_too_large"
    status_code = 413


class OverloadedError(ServingError):
    error_type = "overloaded"
    status_code = 429


class GenerationError(ServingError):
    """Generation started (or an adapter was needed) and failed for this request only."""

    error_type = "generation"
    status_code = 424


class UnavailableError(ServingError):
    """The engine is not running (starting up, shutting down, or died)."""

    error_type = "unavailable"
    status_code = 503


def error_of_type(error_type: str, message: str) -> ServingError:
    """The exception for an error that crossed the engine thread as (error_type, message)."""
    for cls in (ValidationError, NotFoundError, PayloadTooLargeError, OverloadedError, UnavailableError):
        if cls.error_type == error_type:
            return cls(message)
    return GenerationError(message)


class StartupError(Exception):
    """An expected reason the server can't start (bad model directory, unsupported architecture,
    not enough memory...). The message is for the user: what failed, why, and what to do. The CLI
    prints it as one line and exits non-zero, without a traceback."""


class UnsupportedModelError(StartupError, ValueError):
    """The checkpoint's config names something the engine can't run exactly (refused, never approximated)."""


class ExitCode(IntEnum):
    """The process's exit status, for supervisors (Docker, Kubernetes, systemd) and scripts."""

    OK = 0
    INVALID_CONFIG = 2  # a flag or configuration value is malformed (argparse uses 2 as well)
    ENGINE_DIED = 3  # the engine loop died while serving: restarting is the cure
    CANNOT_START = 4  # a StartupError: model, device, port or adapter the user must fix; a restart alone won't
    START_CRASHED = 5  # an unexpected exception while starting (a bug): the traceback is in the log


def one_line(error: BaseException | str, limit: int = 500) -> str:
    """A message as one line (library errors often span several), cut at `limit` characters."""
    text = " ".join(str(error).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
