"""Which adapter a request is for, read from its route and JSON body: the multiplexed model id under
which Ray Serve routes it to a replica that already holds that adapter. Pure: no Ray, no engine."""

from __future__ import annotations

import json
import re
from typing import Collection, Optional

_TENANT = r"(?:/[^/]+/deployments/v2/llms/[^/]+)?"
# POST / (and the bare tenant path) is the route lorax-client uses
NATIVE_ROUTE = re.compile(rf"^{_TENANT}(?:/generate|/generate_stream|/)?$")
OPENAI_ROUTE = re.compile(rf"^{_TENANT}/v1/(?:chat/completions|completions)$")
# generation routes are safe to run again on another replica when one dies before answering
_RETRYABLE = (NATIVE_ROUTE, OPENAI_ROUTE)


def adapter_of(method: str, path: str, body: bytes, base_names: Collection[str] = ()) -> Optional[str]:
    """The adapter id a request names, or None (the base model, merged adapters, another route, a body
    that is not JSON: any replica serves those, and the replica's own validation answers bad bodies)."""
    if method != "POST":
        return None
    if NATIVE_ROUTE.match(path):
        return _native_adapter(_json_object(body))
    if OPENAI_ROUTE.match(path):
        return _openai_adapter(_json_object(body), base_names)
    return None


def is_generation(method: str, path: str) -> bool:
    """A request that only generates (no state changes): one a replica that died can hand to another."""
    return method == "POST" and any(route.match(path) for route in _RETRYABLE)


def _json_object(body: bytes) -> dict:
    try:
        parsed = json.loads(body) if body else {}
    except (ValueError, UnicodeDecodeError):
        return {}
    return parsed if isinstance(parsed, dict) else {}


def _native_adapter(body: dict) -> Optional[str]:
    parameters = body.get("parameters")
    if not isinstance(parameters, dict) or parameters.get("merged_adapters"):
        return None  # a merge is computed per spec: no replica is the better one
    adapter = parameters.get("adapter_id")
    if not isinstance(adapter, str) or not adapter:
        return None
    source = parameters.get("adapter_source")
    # the same id from another source is another adapter (a different load on the replica)
    return adapter if source in (None, "", "pbase") else f"{source}:{adapter}"


def _openai_adapter(body: dict, base_names: Collection[str]) -> Optional[str]:
    model = body.get("model")
    if not isinstance(model, str) or not model or model in base_names:
        return None
    return model
