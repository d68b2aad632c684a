"""Adapter management: list known and loaded adapters, load and unload by id."""

from __future__ import annotations

import asyncio
from typing import Optional

from fastapi import APIRouter, Request
from pydantic import BaseModel

from server.adapters.weights import AdapterKey, AdapterWeights
from server.api.native import engine_of

router = APIRouter(prefix="/adapters", tags=["adapters"])


class AdapterRef(BaseModel):
    adapter_id: str
    adapter_source: Optional[str] = None


class AdapterInfo(BaseModel):
    id: str
    source: str
    tiers: list[str]  # any of "device", "cpu", "disk"
    rank: Optional[int] = None
    size_bytes: Optional[int] = None
    target_modules: list[str] = []
    last_used: Optional[float] = None  # unix time of the last request naming it


class AdapterList(BaseModel):
    adapters: list[AdapterInfo]
    max_active_adapters: int  # an optional cap on device-resident adapters; 0: none
    max_adapter_memory_mb: int  # what bounds the device-resident adapters
    device_adapter_memory_mb: float  # what they take now
    max_cpu_adapters: int


def _info(weights: AdapterWeights, tiers: list[str], last_used: Optional[float]) -> AdapterInfo:
    return AdapterInfo(id=weights.key.id, source=weights.key.source, tiers=tiers, rank=weights.rank,
                       size_bytes=weights.size_bytes, target_modules=weights.target_modules, last_used=last_used)


@router.get("", response_model=AdapterList)
async def list_adapters(request: Request) -> AdapterList:
    engine = engine_of(request)
    store = engine.store
    resident = engine.engine.scheduler.adapters
    device = {a.key for a in list(resident.active)}
    entries: dict[AdapterKey, AdapterInfo] = {}
    for weights in store.cpu_resident():
        tiers = ["device", "cpu", "disk"] if weights.key in device else ["cpu", "disk"]
        entries[weights.key] = _info(weights, tiers, store.last_used(weights.key))
    for adapter_id in store.sources["pbase"].list_known():
        key = AdapterKey("pbase", adapter_id)
        entries.setdefault(key, AdapterInfo(id=adapter_id, source="pbase", tiers=["disk"],
                                            last_used=store.last_used(key)))
    return AdapterList(adapters=sorted(entries.values(), key=lambda a: (a.source, a.id)),
                       max_active_adapters=engine.limits.max_active_adapters,
                       max_adapter_memory_mb=engine.limits.max_adapter_memory_mb,
                       device_adapter_memory_mb=round(resident.bytes_used / 2**20, 1),
                       max_cpu_adapters=store.config.max_cpu_adapters)


@router.post("/load", response_model=AdapterInfo)
async def load_adapter(ref: AdapterRef, request: Request) -> AdapterInfo:
    """Load into the CPU tier now (the device tier follows on first use); 424 if it can't load."""
    engine = engine_of(request)
    key = engine.store.key_for(ref.adapter_id, ref.adapter_source)
    weights = await asyncio.wrap_future(engine.store.get(key))
    return _info(weights, ["cpu", "disk"], engine.store.last_used(key))


@router.post("/unload")
async def unload_adapter(ref: AdapterRef, request: Request) -> dict:
    """Drop from the CPU tier and, once no running request uses it, from the device."""
    engine = engine_of(request)
    key = engine.store.key_for(ref.adapter_id, ref.adapter_source)
    was_loaded = engine.unload_adapter(key)
    return {"adapter_id": ref.adapter_id, "unloaded": was_loaded}
