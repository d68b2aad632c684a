"""Batch inference: a dataset of OpenAI batch rows run through the server's own OpenAI routes,
in-process (an ASGI call into this very app), so each row gets exactly what live traffic gets:
the same validation, adapters, batching and error shapes. A bounded number of rows is in flight at
once, so interactive requests keep their place; one job runs at a time; a row's error stays in its
row. Results are OpenAI batch-output JSONL, fetched through a pre-signed URL.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Optional

import httpx

from server.control.dataset_files import BatchRow, batch_rows
from server.control.db import ControlDB

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS batch_jobs (
    uuid TEXT PRIMARY KEY,
    dataset TEXT NOT NULL,
    dataset_path TEXT NOT NULL,
    dataset_file_name TEXT NOT NULL,
    original_request TEXT NOT NULL,
    status TEXT NOT NULL,
    error TEXT,
    result_path TEXT,
    rows_total INTEGER NOT NULL DEFAULT 0,
    rows_done INTEGER NOT NULL DEFAULT 0,
    rows_failed INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL
);
"""


class BatchStatus(str, Enum):
    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"
    ERRORED = "errored"
    CANCELED = "canceled"

    @property
    def terminal(self) -> bool:
        return self in (BatchStatus.COMPLETED, BatchStatus.ERRORED, BatchStatus.CANCELED)


@dataclass(frozen=True)
class BatchJob:
    uuid: str
    dataset: str
    dataset_path: str
    dataset_file_name: str
    original_request: dict
    status: BatchStatus
    error: Optional[str]
    result_path: Optional[str]
    rows_total: int
    rows_done: int
    rows_failed: int  # of rows_done: answered with an error status, or not run at all
    created_at: float

    @classmethod
    def from_row(cls, row: dict) -> "BatchJob":
        return cls(row["uuid"], row["dataset"], row["dataset_path"], row["dataset_file_name"],
                   json.loads(row["original_request"]), BatchStatus(row["status"]), row["error"], row["result_path"],
                   row["rows_total"], row["rows_done"], row["rows_failed"], row["created_at"])

    def to_api(self) -> dict:
        """The SDK's BatchInferenceJob, plus row counts."""
        return {"uuid": self.uuid, "originalRequest": self.original_request, "status": self.status.value,
                "error": self.error, "resultPath": self.result_path, "dataset": self.dataset,
                "rowsTotal": self.rows_total, "rowsCompleted": self.rows_done, "rowsFailed": self.rows_failed}


class BatchJobs:
    def __init__(self, db: ControlDB, work_dir: Path) -> None:
        self.db, self.work_dir = db, work_dir
        db.ensure(SCHEMA)
        self.wakeup = asyncio.Event()
        for job in self._where("status = ?", (BatchStatus.RUNNING.value,)):  # its task died with the server
            self._set(job.uuid, BatchStatus.ERRORED, error="the server restarted while this job ran; create it again")

    def create(self, dataset: str, path: Path, file_name: str, rows: int, original_request: dict) -> BatchJob:
        """`rows`: the count the caller's check of the file found (the runner reads it again to run it)."""
        job_uuid = str(uuid.uuid4())
        self.db.execute("INSERT INTO batch_jobs (uuid, dataset, dataset_path, dataset_file_name, original_request, "
                        "status, rows_total, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                        (job_uuid, dataset, str(path), file_name, json.dumps(original_request),
                         BatchStatus.QUEUED.value, rows, time.time()))
        self.wakeup.set()
        log.info("batch job %s queued: %d rows of dataset %s", job_uuid, rows, dataset)
        return self.get(job_uuid)

    def get(self, job_uuid: str) -> Optional[BatchJob]:
        rows = self._where("uuid = ?", (job_uuid,))
        return rows[0] if rows else None

    def recent(self, limit: int) -> list[BatchJob]:
        rows = self.db.all("SELECT * FROM batch_jobs ORDER BY created_at DESC LIMIT ?", (limit,))
        return [BatchJob.from_row(row) for row in rows]

    def next_queued(self) -> Optional[BatchJob]:
        rows = self._where("status = ?", (BatchStatus.QUEUED.value,))
        return rows[0] if rows else None

    def _where(self, condition: str, args: tuple) -> list[BatchJob]:
        rows = self.db.all(f"SELECT * FROM batch_jobs WHERE {condition} ORDER BY created_at", args)
        return [BatchJob.from_row(row) for row in rows]

    def _set(self, job_uuid: str, status: BatchStatus, **fields) -> bool:
        """Moves a job on unless it has already ended (a cancel wins over a late completion)."""
        assignments = ", ".join(f"{name} = ?" for name in ("status", *fields))
        changed = self.db.execute(f"UPDATE batch_jobs SET {assignments} WHERE uuid = ? AND status IN (?, ?)",
                                  (status.value, *fields.values(), job_uuid, BatchStatus.QUEUED.value,
                                   BatchStatus.RUNNING.value))
        return changed > 0

    def start(self, job_uuid: str, result_path: Path) -> bool:
        return self._set(job_uuid, BatchStatus.RUNNING, result_path=str(result_path))

    def count_done(self, job_uuid: str, failed: bool) -> None:
        self.db.execute("UPDATE batch_jobs SET rows_done = rows_done + 1, rows_failed = rows_failed + ? "
                        "WHERE uuid = ?", (int(failed), job_uuid))

    def finish(self, job_uuid: str, error: Optional[str] = None) -> bool:
        status = BatchStatus.ERRORED if error else BatchStatus.COMPLETED
        return self._set(job_uuid, status, error=error)

    def cancel(self, job_uuid: str) -> bool:
        return self._set(job_uuid, BatchStatus.CANCELED, error="canceled by the user")

    def is_canceled(self, job_uuid: str) -> bool:
        job = self.get(job_uuid)
        return job is None or job.status is BatchStatus.CANCELED


@dataclass(frozen=True)
class RowCaller:
    """Posts one row to this app's own route, as a client would (the key, if keys are set)."""

    client: httpx.AsyncClient
    api_key: Optional[str]
    base_model: str

    async def __call__(self, row: BatchRow) -> dict:
        body = {**row.body, "stream": False}
        if body.get("model") in (None, ""):
            body["model"] = self.base_model
        headers = {"authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        request_id = f"batch_req_{uuid.uuid4().hex}"
        headers["x-request-id"] = request_id
        response = await self.client.post(row.url, json=body, headers=headers)
        try:
            payload = response.json()
        except ValueError:
            payload = {"error": {"message": response.text[:500]}}
        return {"id": request_id, "custom_id": row.custom_id, "error": None,
                "response": {"status_code": response.status_code, "request_id": request_id, "body": payload}}


class BatchRunner:
    """An asyncio task on the server's loop: one job at a time, `concurrency` rows in flight."""

    def __init__(self, jobs: BatchJobs, app, concurrency: int, api_key: Optional[str], base_model) -> None:
        self.jobs, self.app, self.concurrency, self.api_key = jobs, app, concurrency, api_key
        self.base_model = base_model  # () -> the served model's name, None while it loads
        self._task: Optional[asyncio.Task] = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="batch-runner")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _loop(self) -> None:
        while True:
            job, base_model = self.jobs.next_queued(), self.base_model()
            if job is None or base_model is None:
                self.jobs.wakeup.clear()
                try:
                    await asyncio.wait_for(self.jobs.wakeup.wait(), timeout=1.0)
                except asyncio.TimeoutError:
                    pass
                continue
            try:
                await self._run(job, base_model)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the runner outlives any one job
                log.exception("batch job %s failed", job.uuid)
                self.jobs.finish(job.uuid, error=f"internal error: {type(exc).__name__}: {exc}")

    async def _run(self, job: BatchJob, base_model: str) -> None:
        result_path = self.jobs.work_dir / job.uuid / "results.jsonl"
        result_path.parent.mkdir(parents=True, exist_ok=True)
        if not self.jobs.start(job.uuid, result_path):
            return
        rows = batch_rows(Path(job.dataset_path), job.dataset_file_name)
        log.info("batch job %s running: %d rows, %d at a time", job.uuid, len(rows), self.concurrency)
        transport = httpx.ASGITransport(app=self.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://loraserve.batch", timeout=None) as client:
            caller = RowCaller(client, self.api_key, base_model)
            with open(result_path, "w") as out:
                completed = await self._rows(job.uuid, rows, caller, out)
        if completed and self.jobs.finish(job.uuid):
            log.info("batch job %s completed: %d rows", job.uuid, len(rows))

    async def _rows(self, job_uuid: str, rows: list[BatchRow], caller: RowCaller, out) -> bool:
        """All rows, `concurrency` at a time, each result written as it lands; False if canceled."""
        limit = asyncio.Semaphore(self.concurrency)

        async def one(row: BatchRow) -> None:
            async with limit:
                if self.jobs.is_canceled(job_uuid):
                    return
                try:
                    result = await caller(row)
                except Exception as exc:  # this row failed to run at all; the others go on
                    log.warning("batch job %s row %s failed: %s", job_uuid, row.custom_id, exc)
                    result = {"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": row.custom_id, "response": None,
                              "error": {"code": "internal", "message": f"{type(exc).__name__}: {exc}"}}
                out.write(json.dumps(result) + "\n")
                out.flush()
                self.jobs.count_done(job_uuid, failed=result["error"] is not None
                                     or result["response"]["status_code"] >= 400)

        tasks = [asyncio.create_task(one(row)) for row in rows]
        watcher = asyncio.create_task(self._cancel_when_asked(job_uuid, tasks))
        await asyncio.gather(*tasks, return_exceptions=True)
        watcher.cancel()
        return not self.jobs.is_canceled(job_uuid)

    async def _cancel_when_asked(self, job_uuid: str, tasks: list[asyncio.Task]) -> None:
        while not all(t.done() for t in tasks):
            if self.jobs.is_canceled(job_uuid):
                for task in tasks:
                    task.cancel()  # the in-flight rows' requests leave the engine's batch
                log.info("batch job %s canceled", job_uuid)
                return
            await asyncio.sleep(0.25)
