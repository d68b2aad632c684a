"""The fine-tuning routes the SDK calls: create (checked in full before anything is created, and
never a 5xx after, since the SDK retries POSTs), get, timeline, cancel, and the metrics WebSocket
with history replay, closed with 1000 when the job is over."""

from __future__ import annotations

import asyncio
import logging
import uuid
from pathlib import Path
from typing import Any, Optional

from fastapi import APIRouter, Request, WebSocket
from pydantic import BaseModel

from server.api.middleware import bearer_key_ok
from server.api.native import engine_of
from server.control.dataset_files import DatasetKind
from server.control.deployments import check_served_model
from server.control.jobs import FinetuneJob, FinetuneJobs, JobRequest
from server.control.plane import ControlPlane, control_of
from server.control.repos import check_repo_name
from server.control.trainer import resolve_params
from server.errors import BadRequestError, ConflictError, NotFoundError

log = logging.getLogger(__name__)
router = APIRouter(tags=["fine-tuning"])
WS_POLL_S = 0.25


class CreateJob(BaseModel):
    params: dict[str, Any] = {}
    dataset: str
    repo: str
    continueFromVersion: Optional[str] = None
    description: Optional[str] = None
    computeSpec: Optional[dict[str, Any]] = None


def _jobs(request: Request) -> FinetuneJobs:
    return control_of(request).jobs


def _job(request: Request, job_uuid: str) -> FinetuneJob:
    job = _jobs(request).get(job_uuid)
    if job is None:
        raise NotFoundError(f"fine-tuning job {job_uuid!r} not found")
    return job


def _accelerator(request: Request) -> str:
    engine = getattr(request.app.state, "engine", None)
    return engine.loaded.device.type if engine is not None else "cpu"


# declared before /{job_uuid}: literal paths first
@router.get("/v2/finetuning/jobs/cost-estimate")
async def cost_estimate() -> dict:
    return {"estimatedCost": -1}  # a local machine costs nothing per job; the SDK prints only positive costs


@router.post("/v2/finetuning/jobs")
async def create_job(body: CreateJob, request: Request) -> dict:
    control, engine = control_of(request), engine_of(request)
    continue_dir = _continue_from(control, body.continueFromVersion)
    params = _checked_params(body.params, engine.loaded.name)
    check_served_model(engine, params["base_model"])
    control.repos.find(body.repo)  # 404: fine-tunes go into a repo made first (pb.repos.create), as hosted
    path, file_name, summary = control.datasets.dataset_file(body.dataset)
    if summary.kind is DatasetKind.BATCH:
        raise BadRequestError(f"dataset {body.dataset!r} holds batch-inference rows, not training rows")
    job_uuid = str(uuid.uuid4())
    tag = control.repos.reserve_version(body.repo, engine.loaded.name, job_uuid, body.description)
    job = control.jobs.create(job_uuid, JobRequest(
        repo=body.repo, tag=tag, base_model=engine.loaded.name, dataset=body.dataset, dataset_path=path,
        dataset_file_name=file_name, params=params, description=body.description,
        continue_from=body.continueFromVersion, continue_from_dir=continue_dir))
    return job.to_api(engine.loaded.device.type)


def _checked_params(params: dict, served: str) -> dict:
    params = {**params, "base_model": params.get("base_model") or served}  # unset: the served model
    try:
        return resolve_params(params)
    except ValueError as exc:
        raise BadRequestError(f"invalid fine-tuning parameters: {exc}") from None


def _continue_from(control: ControlPlane, version: Optional[str]) -> Optional[Path]:
    if not version:
        return None
    repo, _, tag = version.partition("/")
    if not tag.isdigit():
        raise BadRequestError(f'continueFromVersion must look like "repo/N"; got {version!r}')
    folder = control.repos.version_dir(check_repo_name(repo), int(tag))  # never a path out of the store
    if not (folder / "adapter_config.json").is_file():
        raise NotFoundError(f"continueFromVersion {version!r} not found")
    return folder.resolve()


@router.get("/v2/finetuning/jobs")
async def list_jobs(request: Request, limit: int = 20) -> dict:
    """Not an SDK call (it has none): the newest jobs with their progress, for the web playground."""
    jobs, accelerator = _jobs(request), _accelerator(request)
    listed = [{**job.to_api(accelerator), "progress": jobs.feed.progress(job.uuid), "timeline": job.timeline}
              for job in jobs.recent(max(1, min(limit, 200)))]
    return {"data": {"jobs": listed}}


@router.get("/v2/finetuning/jobs/{job_uuid}")
async def get_job(job_uuid: str, request: Request) -> dict:
    return _job(request, job_uuid).to_api(_accelerator(request))


@router.get("/v2/finetuning/jobs/{job_uuid}/timeline")
async def timeline(job_uuid: str, request: Request) -> dict:
    return _job(request, job_uuid).timeline


@router.post("/v2/finetuning/jobs/{job_uuid}/cancel")
async def cancel(job_uuid: str, request: Request) -> dict:
    job = _job(request, job_uuid)
    if job.status.terminal:
        raise ConflictError(f"fine-tuning job {job_uuid} is already {job.status.value}")
    _jobs(request).cancel(job_uuid)
    return _job(request, job_uuid).to_api(_accelerator(request))


@router.put("/v2/finetuning/jobs/{job_uuid}/config")
async def update_config(job_uuid: str, request: Request) -> dict:
    job = _job(request, job_uuid)
    raise BadRequestError(f"a job's configuration can't be changed once created (job {job.uuid} is "
                          f"{job.status.value}); cancel it and create another")


@router.get("/v2/finetuning/jobs/{job_uuid}/metrics")
async def metrics_history(job_uuid: str, request: Request) -> dict:
    """The WebSocket's messages so far, over plain HTTP (a browser can't put a key on a WebSocket)."""
    _job(request, job_uuid)
    messages, closed = _jobs(request).feed.since(job_uuid, 0)
    return {"messages": messages, "completed": closed}


@router.get("/v2/finetuning/jobs/{job_uuid}/tensorboard_logs")
async def tensorboard_logs(job_uuid: str, request: Request) -> dict:
    _job(request, job_uuid)
    return {"files": [], "more": False}


@router.websocket("/v2/finetuning/jobs/{job_uuid}/metrics/stream")
async def metrics_stream(websocket: WebSocket, job_uuid: str) -> None:
    """The whole history, then live messages, then a close with 1000 once the job is over. The
    bearer key is checked here: the HTTP auth middleware lets WebSockets through."""
    if not _authorized(websocket):
        await websocket.close(code=1008)  # before accept: the handshake gets a 403
        return
    jobs: FinetuneJobs = websocket.app.state.control.jobs
    if jobs.get(job_uuid) is None:
        await websocket.close(code=1008)
        return
    await websocket.accept()
    sent = 0
    while True:
        messages, closed = jobs.feed.since(job_uuid, sent)
        for message in messages:
            await websocket.send_json(message)
        sent += len(messages)
        if closed:
            break
        await asyncio.sleep(WS_POLL_S)
    await websocket.close(code=1000)


def _authorized(websocket: WebSocket) -> bool:
    keys = websocket.app.state.settings.http.api_keys
    return not keys or bearer_key_ok(websocket.scope, [key.encode() for key in keys])

