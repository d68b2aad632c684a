"""The batch-inference routes the SDK's `pb.beta.batch_inference` calls: create (the dataset and
base model checked first), get, list, cancel, and a pre-signed link to the results."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel

from server.api.native import engine_of
from server.control.batch import BatchJob, BatchJobs
from server.control.dataset_files import DatasetKind
from server.control.deployments import check_served_model
from server.control.plane import control_of
from server.errors import BadRequestError, ConflictError, NotFoundError

router = APIRouter(tags=["batch-inference"])


class CreateBatch(BaseModel):
    dataset: str
    serverConfig: dict[str, Any] = {}


def _batches(request: Request) -> BatchJobs:
    return control_of(request).batches


def _job(request: Request, job_uuid: str) -> BatchJob:
    job = _batches(request).get(job_uuid)
    if job is None:
        raise NotFoundError(f"batch inference job {job_uuid!r} not found")
    return job


@router.post("/v2/batch-inference")
async def create_batch(body: CreateBatch, request: Request) -> dict:
    control, engine = control_of(request), engine_of(request)
    check_served_model(engine, body.serverConfig.get("baseModel") or engine.loaded.name)
    path, file_name, summary = control.datasets.dataset_file(body.dataset)
    if summary.kind is not DatasetKind.BATCH:
        raise BadRequestError(f"dataset {body.dataset!r} holds training rows; batch inference needs OpenAI batch "
                              "rows (`custom_id`, `url`, `body`)")
    return control.batches.create(body.dataset, path, file_name, summary.rows, body.model_dump()).to_api()


@router.get("/v2/batch-inference")
async def list_batches(request: Request, limit: int = 10) -> dict:
    return {"data": {"jobs": [job.to_api() for job in _batches(request).recent(max(1, min(limit, 1000)))]}}


@router.get("/v2/batch-inference/{job_uuid}")
async def get_batch(job_uuid: str, request: Request) -> dict:
    return _job(request, job_uuid).to_api()


@router.post("/v2/batch-inference/{job_uuid}/cancel")
async def cancel_batch(job_uuid: str, request: Request) -> dict:
    job = _job(request, job_uuid)
    if job.status.terminal:
        raise ConflictError(f"batch inference job {job_uuid} is already {job.status.value}")
    _batches(request).cancel(job_uuid)
    return _job(request, job_uuid).to_api()


@router.get("/v2/batch-inference/{job_uuid}/results")
async def results(job_uuid: str, request: Request) -> dict:
    job = _job(request, job_uuid)
    if job.result_path is None:
        raise BadRequestError(f"batch inference job {job_uuid} has no results yet (it is {job.status.value})")
    control = control_of(request)
    url = control.blobs.issue(control.base_url(request), "GET", Path(job.result_path), f"{job_uuid}.jsonl")
    return {"url": url, "status": job.status.value, "rowsCompleted": job.rows_done, "rowsTotal": job.rows_total}
