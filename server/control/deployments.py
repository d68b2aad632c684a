"""Deployments as the SDK sees them: one model served under many names (its own, the configured
`deployment_names`, and aliases made over the API, kept in the database), plus the reads the SDK
makes at start (`/users/current`) and while a deployment comes up (`/llms/{name}/events`).
"""

from __future__ import annotations

from typing import Any, Optional

from fastapi import APIRouter, Request
from pydantic import BaseModel

from server.adapters.sources import _NAME
from server.api.native import engine_of
from server.control.plane import ControlPlane, control_of
from server.control.repos import utc_now
from server.engine.async_engine import AsyncEngine
from server.errors import BadRequestError, NotFoundError

router = APIRouter(tags=["control"])
TENANT = "local"
SCHEMA = """
CREATE TABLE IF NOT EXISTS deployments (name TEXT PRIMARY KEY, description TEXT, created_at TEXT NOT NULL);
"""


def served_names(engine: AsyncEngine) -> set[str]:
    """What a base model may be called to mean the served one (compared lower-case)."""
    return {engine.loaded.name.lower(), engine.loaded.model_dir.name.lower()}


def is_served_model(engine: AsyncEngine, base_model: object) -> bool:
    """Whether `base_model` names the model this server serves (its name, its directory's name, or
    either after a hub organisation: "HuggingFaceTB/SmolLM2-135M-Instruct")."""
    if not isinstance(base_model, str) or not base_model:
        return False
    names = served_names(engine)
    return base_model.lower() in names or base_model.lower().rsplit("/", 1)[-1] in names


def check_served_model(engine: AsyncEngine, base_model: object) -> None:
    if not is_served_model(engine, base_model):
        raise BadRequestError(f"this server serves {engine.loaded.name}; {base_model!r} is another model "
                              f"(run another loraserve with --model for it)")


class AliasStore:
    """The deployment names made over the API (the configured ones live in the settings)."""

    def __init__(self, plane: ControlPlane) -> None:
        self.plane, self.db = plane, plane.db
        self.db.ensure(SCHEMA)

    def aliases(self) -> set[str]:
        return {r["name"].lower() for r in self.db.all("SELECT name FROM deployments")}

    def configured(self, engine: AsyncEngine) -> set[str]:
        return {engine.loaded.name.lower(), *(n.lower() for n in self.plane.settings.http.deployment_names)}

    def names(self, engine: AsyncEngine) -> list[str]:
        configured = [engine.loaded.name, *self.plane.settings.http.deployment_names]
        rows = [r["name"] for r in self.db.all("SELECT name FROM deployments ORDER BY created_at")]
        return list(dict.fromkeys([*configured, *rows]))

    def check(self, engine: AsyncEngine, name: str) -> None:
        if name.lower() not in self.configured(engine) | self.aliases():
            raise NotFoundError(f"deployment {name!r} not found; this server serves {self.names(engine)}")

    def create(self, engine: AsyncEngine, name: str, description: Optional[str]) -> None:
        if len(name) > 128 or not _NAME.match(name):
            raise BadRequestError(f"invalid deployment name {name!r}: use letters, digits, '.', '_' and '-'")
        if name.lower() in self.configured(engine):
            return  # already served under that name
        self.db.execute("INSERT OR IGNORE INTO deployments (name, description, created_at) VALUES (?, ?, ?)",
                        (name.lower(), description, utc_now()))

    def delete(self, engine: AsyncEngine, name: str) -> None:
        if name.lower() in self.configured(engine):
            raise BadRequestError(f"deployment {name!r} is configured (the model's name or deployment_names); "
                                  "only deployments made over the API can be deleted")
        if not self.db.execute("DELETE FROM deployments WHERE name = ?", (name.lower(),)):
            raise NotFoundError(f"deployment {name!r} not found")


def deployment(engine: AsyncEngine, name: str, description: Optional[str] = None) -> dict[str, Any]:
    """The SDK's Deployment shape (every required key present)."""
    return {"name": name, "uuid": name, "description": description, "type": "dedicated", "status": "ready",
            "model": {"name": engine.loaded.name, "maxInputLength": engine.limits.max_input_length},
            "accelerator": {"id": engine.loaded.device.type}, "currentReplicas": 1, "config": {},
            "usesGuaranteedCapacity": False, "quantization": None}


# -- routes ---------------------------------------------------------------------------------------
class CreateDeployment(BaseModel):
    name: str
    description: Optional[str] = None
    config: dict = {}


class UpdateDeployment(BaseModel):
    description: Optional[str] = None
    config: Optional[dict] = None


def aliases_of(request: Request) -> AliasStore:
    return control_of(request).deployments


@router.get("/users/current")
async def current_user() -> dict:
    """One tenant; a full subscription object (null makes the SDK warn on every `Predibase()`)."""
    subscription = {"id": 1, "tier": "self-hosted", "isTrial": False, "expiration": None,
                    "daysRemainingInPlan": None, "active": True}
    return {"id": 1, "username": "loraserve", "uuid": "00000000-0000-0000-0000-000000000001",
            "tenant": {"name": "loraserve", "shortCode": TENANT, "subscription": subscription}}


@router.get("/v2/deployments")
async def list_deployments(request: Request) -> dict:
    engine = engine_of(request)
    return {"data": [deployment(engine, name) for name in aliases_of(request).names(engine)]}


@router.get("/v2/deployments/recommended-config")
async def recommended_config(request: Request, baseModel: Optional[str] = None) -> dict:  # noqa: N803 (the SDK's name)
    engine = engine_of(request)
    if baseModel:
        check_served_model(engine, baseModel)
    return {"baseModel": engine.loaded.name, "minReplicas": 1, "maxReplicas": 1, "cooldownTime": None,
            "accelerator": engine.loaded.device.type, "maxTotalTokens": engine.limits.max_total_tokens}


@router.get("/v2/deployments/{name}")
async def get_deployment(name: str, request: Request) -> dict:
    engine = engine_of(request)
    aliases_of(request).check(engine, name)  # 404 for names this server does not serve
    return {"data": deployment(engine, name)}


@router.post("/v2/deployments")
async def create_deployment(body: CreateDeployment, request: Request) -> dict:
    engine = engine_of(request)
    check_served_model(engine, body.config.get("baseModel"))
    aliases_of(request).create(engine, body.name, body.description)
    return {"data": deployment(engine, body.name, body.description)}


@router.put("/v2/deployments/{name}")
async def update_deployment(name: str, body: UpdateDeployment, request: Request) -> dict:
    """Accepted and ignored: one process serves one configuration, set at start."""
    engine = engine_of(request)
    aliases_of(request).check(engine, name)
    return {"data": deployment(engine, name, body.description)}


@router.delete("/v2/deployments/{name}")
async def delete_deployment(name: str, request: Request) -> dict:
    aliases_of(request).delete(engine_of(request), name)
    return {"deleted": name}


@router.get("/llms/{name}/events")
async def deployment_events(name: str, request: Request) -> dict:
    """What `deployments.create(block=True)` polls: ready at once (the model is already loaded)."""
    engine = engine_of(request)
    aliases_of(request).check(engine, name)
    now = utc_now()
    return {"name": name, "ComputeEvents": [{"eventType": "Ready", "timestamp": now}],
            "resourceActiveTime": now, "deploymentStatus": "ready"}
