"""Assembly of the control plane: builds the `ControlPlane` with its resource stores, includes every
control router into the app, and starts (and stops) the fine-tuning and batch runners."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from fastapi import APIRouter, FastAPI

from server.config import Settings
from server.control import batch_inference, datasets, deployments, finetuning, openai_batch, presigned, repos
from server.control.batch import BatchJobs, BatchRunner
from server.control.jobs import FinetuneJobs, TrainerSetup, TrainingRunner
from server.control.plane import ControlPlane

ROUTERS: list[APIRouter] = [presigned.router, repos.router, datasets.router, deployments.router, finetuning.router,
                            batch_inference.router, openai_batch.router]


def build_control_plane(settings: Settings, home: Path) -> ControlPlane:
    plane = ControlPlane(settings, home)
    plane.repos = repos.RepoStore(plane)
    plane.datasets = datasets.DatasetStore(plane)
    plane.deployments = deployments.AliasStore(plane)
    plane.jobs = FinetuneJobs(plane.db, plane.repos, plane.staging_dir, plane.root / "jobs")
    plane.batches = BatchJobs(plane.db, plane.root / "batch")
    plane.openai_files = openai_batch.OpenAIFiles(plane.db, plane.root / "files", plane.batches)
    return plane


def include_control_routers(app: FastAPI) -> None:
    for router in ROUTERS:
        app.include_router(router)


@dataclass
class ControlRunners:
    training: TrainingRunner
    batch: BatchRunner

    async def stop(self) -> None:
        await asyncio.to_thread(self.training.stop)
        await self.batch.stop()


def start_control_runners(app: FastAPI) -> ControlRunners:
    """Jobs wait until the model has loaded (the trainer starts from its weights; batches run on it).
    Called on the event loop: the batch runner is a task there."""
    plane: ControlPlane = app.state.control
    settings = plane.settings

    def trainer_setup() -> Optional[TrainerSetup]:
        engine = app.state.engine
        if engine is None:
            return None
        return TrainerSetup(engine.loaded.model_dir, engine.loaded.name, engine.loaded.device.type,
                            settings.control.training_threads)

    def base_model() -> Optional[str]:
        engine = app.state.engine
        return engine.loaded.name if engine is not None else None

    def share_cpu(training: bool) -> None:
        """While a CPU job trains, serving keeps the cores the trainer doesn't use."""
        engine = app.state.engine
        if engine is not None and engine.loaded.device.type == "cpu":
            engine.reserve_cpu_threads(settings.control.training_threads if training else 0)

    concurrency = max(1, settings.limits.max_batch_size // 2)  # the other half stays for interactive traffic
    keys = settings.http.api_keys
    runners = ControlRunners(TrainingRunner(plane.jobs, trainer_setup, share_cpu),
                             BatchRunner(plane.batches, app, concurrency, keys[0] if keys else None, base_model))
    runners.training.start()
    runners.batch.start()
    return runners
