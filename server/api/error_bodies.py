"""The two error-body shapes, as pure functions with no engine behind them (the gateway uses them too)."""

from __future__ import annotations


def is_openai(path: str) -> bool:
    return "/v1/" in path or path.endswith("/v1")


def error_body(path: str, status: int, error_type: str, message: str) -> dict:
    """OpenAI's {"error": {...}} under /v1/, LoRAX's {"error", "error_type"} elsewhere."""
    if is_openai(path):
        return {"error": {"message": message, "type": error_type, "param": None, "code": status}}
    return {"error": message, "error_type": error_type}
