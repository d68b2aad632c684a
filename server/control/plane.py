"""The control plane's shared state, built once per app: the SQLite store, the directories it owns,
the pre-signed URL registry, and the stores of each resource (repos, datasets, deployments). Routes
reach it through `control_of(request)`; the job and batch runners plug in as `jobs` and `batches`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Protocol

from fastapi import Request

from server.config import Settings
from server.control.db import ControlDB
from server.control.presigned import BlobRegistry
from server.errors import UnavailableError

if TYPE_CHECKING:  # the stores import this module (for control_of); the plane only holds them
    from server.control.datasets import DatasetStore
    from server.control.deployments import AliasStore
    from server.control.repos import RepoStore


class JobsView(Protocol):
    """What the repo and version routes need from the fine-tuning job runner."""

    def status_of(self, job_uuid: str) -> Optional[tuple[str, Optional[str]]]:
        """(status, error) of a job, or None if it is unknown."""

    def repo_busy(self, repo_name: str) -> bool:
        """Whether a job is queued or training into this repo."""


class ControlPlane:
    def __init__(self, settings: Settings, home: Path) -> None:
        self.settings = settings
        self.root = home / "control"  # every file the control plane writes, but adapter weights
        self.db = ControlDB(self.root / "state.db")
        self.adapters_dir = Path(settings.adapters.adapters_dir).resolve()
        self.staging_dir = self.adapters_dir / ".staging"  # same filesystem: os.rename into place is atomic
        self.public_url = settings.control.public_url.rstrip("/")
        self.blobs = BlobRegistry(settings.control.max_upload_mb * 2**20)
        self.jobs: Optional[JobsView] = None
        self.batches: Any = None
        self.openai_files: Any = None
        self.repos: RepoStore
        self.datasets: DatasetStore
        self.deployments: AliasStore

    def base_url(self, request: Request) -> str:
        """Where clients reach this server: `public_url` if set, else what the request itself used."""
        return self.public_url or str(request.base_url).rstrip("/")

    def job_status(self, job_uuid: str) -> Optional[tuple[str, Optional[str]]]:
        return self.jobs.status_of(job_uuid) if self.jobs is not None else None

    def repo_busy(self, repo_name: str) -> bool:
        return self.jobs is not None and self.jobs.repo_busy(repo_name)

    def close(self) -> None:
        self.db.close()


def control_of(request: Request) -> ControlPlane:
    plane: Optional[ControlPlane] = getattr(request.app.state, "control", None)
    if plane is None:  # only before the app's lifespan has started
        raise UnavailableError("the control plane is not started")
    return plane
