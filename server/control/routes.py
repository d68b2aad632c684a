"""Assembly of the control plane: builds the `ControlPlane` with its resource stores, and includes
every control router into the app. A new resource (jobs, batches) adds its router to ROUTERS."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, FastAPI

from server.config import Settings
from server.control import datasets, deployments, presigned, repos
from server.control.plane import ControlPlane

ROUTERS: list[APIRouter] = [presigned.router, repos.router, datasets.router, deployments.router]


def build_control_plane(settings: Settings, home: Path) -> ControlPlane:
    plane = ControlPlane(settings, home)
    plane.repos = repos.RepoStore(plane)
    plane.datasets = datasets.DatasetStore(plane)
    plane.deployments = deployments.AliasStore(plane)
    return plane


def include_control_routers(app: FastAPI) -> None:
    for router in ROUTERS:
        app.include_router(router)
