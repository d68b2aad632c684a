"""Shared by the client scripts in this folder (each runs as `python tests/clients/<script>.py` in
the clients environment, so this folder is on sys.path)."""

from __future__ import annotations


def error_of(call) -> dict:
    """What a call raised, by the SDK's own exception class and message (class None: it didn't)."""
    try:
        call()
    except Exception as exc:  # the SDK's own exception classes are what we record
        return {"class": type(exc).__name__, "message": str(exc)}
    return {"class": None, "message": ""}
