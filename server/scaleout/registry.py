"""What each replica tells the gateway about itself (pid, metrics address), kept in Ray's cluster
key-value store so the gateway can list every replica, not only those that served it a request."""

from __future__ import annotations

import json

from ray.experimental import internal_kv

NAMESPACE = "loraserve"


def _key(app: str, replica_id: str) -> str:
    return f"replica:{app}:{replica_id}"


def announce(app: str, replica_id: str, info: dict) -> None:
    internal_kv._internal_kv_put(_key(app, replica_id), json.dumps(info), overwrite=True, namespace=NAMESPACE)


def lookup(app: str, replica_id: str) -> dict:
    raw = internal_kv._internal_kv_get(_key(app, replica_id), namespace=NAMESPACE)
    return json.loads(raw) if raw else {}
