"""The sliver of Predibase's control plane that its Python SDK calls before generating.

`Predibase(api_token=...)` reads GET /users/current (the tenant's shortCode goes into serving URLs)
and `deployments.client(...)` polls GET /v2/deployments/{name}. A self-hosted server has one tenant
and one deployment (its model, plus the configured aliases), so both answers are fixed.
"""

from __future__ import annotations

from fastapi import APIRouter, Request

from server.api.native import check_deployment, engine_of

router = APIRouter(tags=["predibase-sdk"])
TENANT = "local"


@router.get("/users/current")
async def current_user() -> dict:
    return {"id": 1, "username": "loraserve", "uuid": "00000000-0000-0000-0000-000000000001",
            "tenant": {"name": "loraserve", "shortCode": TENANT, "subscription": None}}


@router.get("/v2/deployments/{deployment}")
async def deployment(deployment: str, request: Request) -> dict:
    check_deployment(request, TENANT, deployment)  # 404 for names this server does not serve
    engine = engine_of(request)
    return {"data": {"name": deployment, "uuid": deployment, "description": None, "type": "dedicated",
                     "status": "ready", "model": {"name": engine.loaded.name,
                                                  "maxInputLength": engine.limits.max_input_length},
                     "accelerator": {"id": engine.loaded.device.type}, "currentReplicas": 1, "config": {},
                     "usesGuaranteedCapacity": False}}
