"""OpenAI's Files and Batch API (`/v1/files`, `/v1/batches`) over the same batch runner as the
Predibase routes, so the `openai` SDK's batch calls work against this server: an uploaded JSONL of
batch rows becomes a batch job; its results come back as an output file."""

from __future__ import annotations

import shutil
import time
import uuid
from pathlib import Path
from typing import Optional

from fastapi import APIRouter, File, Form, Request, UploadFile
from fastapi.responses import FileResponse
from pydantic import BaseModel

from server.api.native import engine_of
from server.control.batch import BatchJob, BatchJobs, BatchStatus
from server.control.dataset_files import DatasetFileError, batch_rows
from server.control.db import ControlDB
from server.control.plane import control_of
from server.errors import BadRequestError, NotFoundError, PayloadTooLargeError

router = APIRouter(tags=["openai-batch"])
SCHEMA = """
CREATE TABLE IF NOT EXISTS openai_files (
    id TEXT PRIMARY KEY, filename TEXT NOT NULL, purpose TEXT NOT NULL, bytes INTEGER NOT NULL,
    created_at INTEGER NOT NULL, path TEXT NOT NULL
);
"""
OUTPUT_PREFIX = "file-output-"  # an output file's id names its batch: no copy of the results is made
STATUS = {BatchStatus.QUEUED: "validating", BatchStatus.RUNNING: "in_progress", BatchStatus.COMPLETED: "completed",
          BatchStatus.ERRORED: "failed", BatchStatus.CANCELED: "cancelled"}
ENDPOINTS = ("/v1/chat/completions", "/v1/completions")


class CreateBatch(BaseModel):
    input_file_id: str
    endpoint: str
    completion_window: str = "24h"
    metadata: Optional[dict[str, str]] = None


class OpenAIFiles:
    """Uploaded files by id, under `<control root>/files/<id>/`; batch outputs are read in place."""

    def __init__(self, db: ControlDB, root: Path, batches: BatchJobs) -> None:
        self.db, self.root, self.batches = db, root, batches
        db.ensure(SCHEMA)

    def add(self, upload: UploadFile, purpose: str, max_bytes: int) -> dict:
        file_id = f"file-{uuid.uuid4().hex[:24]}"
        name = Path((upload.filename or "upload.jsonl").replace("\\", "/")).name or "upload.jsonl"
        path = self.root / file_id / name
        path.parent.mkdir(parents=True)
        size = _copy_capped(upload, path, max_bytes)
        self.db.execute("INSERT INTO openai_files VALUES (?, ?, ?, ?, ?, ?)",
                        (file_id, name, purpose, size, int(time.time()), str(path)))
        return self.get(file_id)

    def get(self, file_id: str) -> dict:
        if file_id.startswith(OUTPUT_PREFIX):
            return self._output_file(file_id)
        row = self.db.one("SELECT * FROM openai_files WHERE id = ?", (file_id,))
        if row is None:
            raise NotFoundError(f"no such file: {file_id}")
        return _file_object(row)

    def path_of(self, file_id: str) -> Path:
        if file_id.startswith(OUTPUT_PREFIX):
            return Path(self._batch_of_output(file_id).result_path)
        return Path(self.get(file_id)["_path"])

    def _batch_of_output(self, file_id: str) -> BatchJob:
        job = self.batches.get(file_id.removeprefix(OUTPUT_PREFIX))
        if job is None or job.result_path is None:
            raise NotFoundError(f"no such file: {file_id}")
        return job

    def _output_file(self, file_id: str) -> dict:
        path = Path(self._batch_of_output(file_id).result_path)
        size = path.stat().st_size if path.is_file() else 0
        return {"id": file_id, "object": "file", "bytes": size, "created_at": int(path.stat().st_mtime) if size else 0,
                "filename": "output.jsonl", "purpose": "batch_output", "status": "processed", "_path": str(path)}

    def all(self) -> list[dict]:
        return [_file_object(row) for row in self.db.all("SELECT * FROM openai_files ORDER BY created_at DESC")]

    def delete(self, file_id: str) -> None:
        path = self.path_of(file_id)
        if file_id.startswith(OUTPUT_PREFIX):
            raise BadRequestError("a batch's output file goes when its batch does")
        self.db.execute("DELETE FROM openai_files WHERE id = ?", (file_id,))
        shutil.rmtree(path.parent, ignore_errors=True)


def _copy_capped(upload: UploadFile, path: Path, max_bytes: int) -> int:
    size = 0
    with open(path, "wb") as out:
        while chunk := upload.file.read(1 << 20):
            size += len(chunk)
            if size > max_bytes:
                out.close()
                shutil.rmtree(path.parent, ignore_errors=True)
                raise PayloadTooLargeError(f"the file is larger than max_upload_mb ({max_bytes >> 20} MB)")
            out.write(chunk)
    return size


def _file_object(row: dict) -> dict:
    return {"id": row["id"], "object": "file", "bytes": row["bytes"], "created_at": row["created_at"],
            "filename": row["filename"], "purpose": row["purpose"], "status": "processed", "_path": row["path"]}


def _public(file: dict) -> dict:
    return {k: v for k, v in file.items() if not k.startswith("_")}


def batch_object(job: BatchJob, created_at: int) -> dict:
    """OpenAI's Batch from our batch job (the request echoed in `original_request`)."""
    request = job.original_request
    status = STATUS[job.status]
    return {"id": f"batch_{job.uuid}", "object": "batch", "endpoint": request.get("endpoint"),
            "errors": {"object": "list", "data": [{"code": "failed", "message": job.error}]}
            if job.status is BatchStatus.ERRORED else None,
            "input_file_id": request.get("input_file_id"), "completion_window": request.get("completion_window"),
            "status": status, "output_file_id": OUTPUT_PREFIX + job.uuid if job.result_path else None,
            "error_file_id": None, "created_at": created_at, "metadata": request.get("metadata"),
            "request_counts": {"total": job.rows_total, "completed": job.rows_done, "failed": job.rows_failed}}


def _files(request: Request) -> OpenAIFiles:
    return control_of(request).openai_files


def _batch(request: Request, batch_id: str) -> BatchJob:
    job = control_of(request).batches.get(batch_id.removeprefix("batch_"))
    if job is None or job.original_request.get("api") != "openai":
        raise NotFoundError(f"no such batch: {batch_id}")
    return job


@router.post("/v1/files")
async def upload_file(request: Request, file: UploadFile = File(...), purpose: str = Form(...)) -> dict:
    if purpose != "batch":
        raise BadRequestError(f"purpose must be 'batch' on this server; got {purpose!r}")
    limit = control_of(request).settings.control.max_upload_mb * 2**20
    return _public(_files(request).add(file, purpose, limit))


@router.get("/v1/files")
async def list_files(request: Request) -> dict:
    return {"object": "list", "data": [_public(f) for f in _files(request).all()], "has_more": False}


@router.get("/v1/files/{file_id}")
async def get_file(file_id: str, request: Request) -> dict:
    return _public(_files(request).get(file_id))


@router.get("/v1/files/{file_id}/content")
async def file_content(file_id: str, request: Request) -> FileResponse:
    return FileResponse(_files(request).path_of(file_id), media_type="application/jsonl")


@router.delete("/v1/files/{file_id}")
async def delete_file(file_id: str, request: Request) -> dict:
    _files(request).delete(file_id)
    return {"id": file_id, "object": "file", "deleted": True}


@router.post("/v1/batches")
async def create_batch(body: CreateBatch, request: Request) -> dict:
    engine_of(request)  # 503 while the model loads
    if body.endpoint not in ENDPOINTS:
        raise BadRequestError(f"endpoint must be one of {', '.join(ENDPOINTS)}; got {body.endpoint!r}")
    files = _files(request)
    path = files.path_of(body.input_file_id)
    try:
        rows = batch_rows(path, path.name)
    except DatasetFileError as exc:
        raise BadRequestError(f"input file {body.input_file_id}: {exc}") from None
    if any(row.url != body.endpoint for row in rows):
        raise BadRequestError(f"every row's url must be the batch's endpoint {body.endpoint}")
    job = control_of(request).batches.create(body.input_file_id, path, path.name, len(rows),
                                             {**body.model_dump(), "api": "openai"})
    return batch_object(job, int(time.time()))


@router.get("/v1/batches")
async def list_batches(request: Request, limit: int = 20) -> dict:
    jobs = [j for j in control_of(request).batches.recent(max(1, min(limit, 100))) if j.original_request.get("api")]
    data = [batch_object(j, int(j.created_at)) for j in jobs]
    return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None, "has_more": False}


@router.get("/v1/batches/{batch_id}")
async def get_batch(batch_id: str, request: Request) -> dict:
    job = _batch(request, batch_id)
    return batch_object(job, int(job.created_at))


@router.post("/v1/batches/{batch_id}/cancel")
async def cancel_batch(batch_id: str, request: Request) -> dict:
    job = _batch(request, batch_id)
    control_of(request).batches.cancel(job.uuid)
    job = _batch(request, batch_id)
    return batch_object(job, int(job.created_at))
