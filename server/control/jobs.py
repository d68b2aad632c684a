"""Fine-tuning jobs: a FIFO queue, run one job at a time by a runner thread, each job in its own
process (`python -m server.control.trainer`), so a crash or OOM there can't take the server down
and a cancel can kill it. The trainer writes the adapter into a staging folder; only a finished
one is renamed into `adapters_dir/<repo>/<tag>`, so `repo/tag` serves from the very next request.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from enum import Enum
from pathlib import Path
from typing import Callable, Optional, Protocol

from server.control.db import ControlDB
from server.control.metrics_feed import MetricsFeed
from server.control.trainer import TrainSpec

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS finetune_jobs (
    uuid TEXT PRIMARY KEY,
    repo TEXT NOT NULL,
    tag INTEGER NOT NULL,
    base_model TEXT NOT NULL,
    dataset TEXT NOT NULL,
    params TEXT NOT NULL,
    description TEXT,
    continue_from TEXT,
    status TEXT NOT NULL,
    error TEXT,
    created_at REAL NOT NULL,
    timeline TEXT NOT NULL
);
"""


class VersionDirs(Protocol):
    def version_dir(self, repo: str, tag: int) -> Path:
        """Where version `tag` of `repo` lives once published."""


class JobStatus(str, Enum):
    QUEUED = "queued"
    TRAINING = "training"
    COMPLETED = "completed"
    ERRORED = "errored"
    CANCELED = "canceled"

    @property
    def terminal(self) -> bool:
        return self in (JobStatus.COMPLETED, JobStatus.ERRORED, JobStatus.CANCELED)


@dataclass(frozen=True)
class FinetuneJob:
    uuid: str
    repo: str
    tag: int
    base_model: str
    dataset: str
    params: dict
    description: Optional[str]
    continue_from: Optional[str]
    status: JobStatus
    error: Optional[str]
    timeline: dict

    @classmethod
    def from_row(cls, row: dict) -> "FinetuneJob":
        return cls(row["uuid"], row["repo"], row["tag"], row["base_model"], row["dataset"], json.loads(row["params"]),
                   row["description"], row["continue_from"], JobStatus(row["status"]), row["error"],
                   json.loads(row["timeline"]))

    def to_api(self, accelerator: str) -> dict:
        """The SDK's FinetuningJob (every field it requires, params echoed in snake_case)."""
        return {"uuid": self.uuid, "baseModel": self.base_model, "datasetName": self.dataset,
                "targetRepoName": self.repo, "targetVersionTag": self.tag, "accelerator": {"id": accelerator},
                "status": self.status.value, "params": self.params, "description": self.description,
                "continueFromVersion": self.continue_from, "error": self.error}


@dataclass(frozen=True)
class JobRequest:
    """A checked create: every name resolved, the version tag already reserved."""

    repo: str
    tag: int
    base_model: str
    dataset: str
    dataset_path: Path
    dataset_file_name: str
    params: dict
    description: Optional[str]
    continue_from: Optional[str]  # "repo/N"
    continue_from_dir: Optional[Path]


@dataclass(frozen=True)
class TrainerSetup:
    """What a job's process needs from the server: the resident model and where it may run."""

    base_model_dir: Path
    base_model_name: str
    device: str
    threads: int


def utc_now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class FinetuneJobs:
    """The queue and its state; the runner thread takes jobs from here."""

    def __init__(self, db: ControlDB, versions: VersionDirs, staging_dir: Path, work_dir: Path) -> None:
        self.db, self.versions, self.staging_dir, self.work_dir = db, versions, staging_dir, work_dir
        db.ensure(SCHEMA)
        self.feed = MetricsFeed(work_dir)
        self.wakeup = threading.Event()
        self._fail_interrupted()

    def _fail_interrupted(self) -> None:
        """A job that was training when the server stopped can't be resumed: its process is gone."""
        for job in self._where("status = ?", (JobStatus.TRAINING.value,)):
            self._finish(job.uuid, JobStatus.ERRORED, "the server restarted while this job was training")

    def create(self, job_uuid: str, request: JobRequest) -> FinetuneJob:
        self.db.execute(
            "INSERT INTO finetune_jobs VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, NULL, ?, ?)",
            (job_uuid, request.repo, request.tag, request.base_model, request.dataset, json.dumps(request.params),
             request.description, request.continue_from, JobStatus.QUEUED.value, time.time(),
             json.dumps({JobStatus.QUEUED.value: {"startedAt": utc_now()}})))
        self._write_inputs(job_uuid, request)
        self.wakeup.set()
        log.info("fine-tune job %s queued: %s/%d from dataset %s", job_uuid, request.repo, request.tag,
                 request.dataset)
        return self.get(job_uuid)

    def _write_inputs(self, job_uuid: str, request: JobRequest) -> None:
        folder = self.work_dir / job_uuid
        folder.mkdir(parents=True, exist_ok=True)
        inputs = {"dataset_path": str(request.dataset_path), "dataset_file_name": request.dataset_file_name,
                  "continue_from_dir": str(request.continue_from_dir) if request.continue_from_dir else None}
        (folder / "inputs.json").write_text(json.dumps(inputs))

    def get(self, job_uuid: str) -> Optional[FinetuneJob]:
        rows = self._where("uuid = ?", (job_uuid,))
        return rows[0] if rows else None

    def _where(self, condition: str, args: tuple) -> list[FinetuneJob]:
        rows = self.db.all(f"SELECT * FROM finetune_jobs WHERE {condition} ORDER BY created_at", args)
        return [FinetuneJob.from_row(row) for row in rows]

    def recent(self, limit: int) -> list[FinetuneJob]:
        rows = self.db.all("SELECT * FROM finetune_jobs ORDER BY created_at DESC LIMIT ?", (limit,))
        return [FinetuneJob.from_row(row) for row in rows]

    def next_queued(self) -> Optional[FinetuneJob]:
        rows = self._where("status = ?", (JobStatus.QUEUED.value,))
        return rows[0] if rows else None

    def status_of(self, job_uuid: str) -> Optional[tuple[str, Optional[str]]]:
        job = self.get(job_uuid)
        return None if job is None else (job.status.value, job.error)

    def repo_busy(self, repo: str) -> bool:
        return bool(self._where("repo = ? AND status IN (?, ?)", (repo, JobStatus.QUEUED.value,
                                                                   JobStatus.TRAINING.value)))

    def mark_training(self, job_uuid: str) -> bool:
        """queued -> training; False if the job was canceled meanwhile."""
        return self._move(job_uuid, JobStatus.TRAINING, None, (JobStatus.QUEUED,))

    def _finish(self, job_uuid: str, status: JobStatus, error: Optional[str]) -> bool:
        return self._move(job_uuid, status, error, (JobStatus.QUEUED, JobStatus.TRAINING))

    def _move(self, job_uuid: str, status: JobStatus, error: Optional[str], allowed: tuple[JobStatus, ...]) -> bool:
        with self.db.transaction() as conn:
            row = conn.execute("SELECT status, timeline FROM finetune_jobs WHERE uuid = ?", (job_uuid,)).fetchone()
            if row is None or JobStatus(row["status"]) not in allowed:
                return False
            timeline = {**json.loads(row["timeline"]), status.value: {"startedAt": utc_now()}}
            conn.execute("UPDATE finetune_jobs SET status = ?, error = ?, timeline = ? WHERE uuid = ?",
                         (status.value, error, json.dumps(timeline), job_uuid))
        if status.terminal:
            self.feed.close(job_uuid)
        return True

    def complete(self, job_uuid: str) -> bool:
        return self._finish(job_uuid, JobStatus.COMPLETED, None)

    def fail(self, job_uuid: str, error: str) -> bool:
        return self._finish(job_uuid, JobStatus.ERRORED, error)

    def cancel(self, job_uuid: str) -> bool:
        """Queued: never runs. Training: the runner sees the status and kills the process."""
        canceled = self._finish(job_uuid, JobStatus.CANCELED, "canceled by the user")
        if canceled:
            log.info("fine-tune job %s canceled", job_uuid)
        return canceled

    def inputs(self, job_uuid: str) -> dict:
        return json.loads((self.work_dir / job_uuid / "inputs.json").read_text())


class TrainingRunner:
    """One thread: takes the oldest queued job, runs its trainer process to the end (or until the job
    is canceled), then moves the finished adapter into place."""

    POLL_S = 0.5
    KILL_GRACE_S = 10.0

    def __init__(self, jobs: FinetuneJobs, setup: Callable[[], Optional[TrainerSetup]],
                 share_cpu: Callable[[bool], None] = lambda training: None) -> None:
        self.jobs, self.setup, self.share_cpu = jobs, setup, share_cpu  # share_cpu(True) while a CPU job trains
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="finetune-runner", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float = KILL_GRACE_S + 5) -> None:
        """Blocks until a running job's process is gone (and its job marked), or `timeout_s`."""
        self._stop.set()
        self.jobs.wakeup.set()
        if self._thread.is_alive():
            self._thread.join(timeout_s)

    def _loop(self) -> None:
        while not self._stop.is_set():
            job, setup = self.jobs.next_queued(), self.setup()
            if job is None or setup is None:  # nothing to do, or the model is still loading
                self.jobs.wakeup.wait(timeout=1.0)
                self.jobs.wakeup.clear()
                continue
            try:
                self._run(job, setup)
            except Exception as exc:  # the runner outlives any one job
                log.exception("fine-tune job %s failed in the runner", job.uuid)
                self.jobs.fail(job.uuid, f"internal error running the job: {type(exc).__name__}: {exc}")

    def _run(self, job: FinetuneJob, setup: TrainerSetup) -> None:
        if not self.jobs.mark_training(job.uuid):
            return
        staging = self.jobs.staging_dir / f"job-{job.uuid}"
        shutil.rmtree(staging, ignore_errors=True)
        spec = self._spec(job, setup, staging)
        log.info("fine-tune job %s training %s/%d on %s (%d threads)", job.uuid, job.repo, job.tag, setup.device,
                 setup.threads)
        if setup.device == "cpu":
            self.share_cpu(True)
        try:
            outcome = self._train(job.uuid, spec)
        finally:
            if setup.device == "cpu":
                self.share_cpu(False)
        if outcome is None:
            self._publish(job, staging)
        else:
            shutil.rmtree(staging, ignore_errors=True)
            if self.jobs.fail(job.uuid, outcome):
                log.warning("fine-tune job %s errored: %s", job.uuid, outcome)

    def _spec(self, job: FinetuneJob, setup: TrainerSetup, staging: Path) -> TrainSpec:
        inputs = self.jobs.inputs(job.uuid)
        return TrainSpec(job_id=job.uuid, base_model_dir=str(setup.base_model_dir),
                         base_model_name=setup.base_model_name, dataset_path=inputs["dataset_path"],
                         dataset_file_name=inputs["dataset_file_name"], params=job.params, output_dir=str(staging),
                         device=setup.device, threads=setup.threads, continue_from=inputs["continue_from_dir"])

    def _publish(self, job: FinetuneJob, staging: Path) -> None:
        """The atomic step: the version's folder appears complete or not at all."""
        target = self.jobs.versions.version_dir(job.repo, job.tag)
        target.parent.mkdir(parents=True, exist_ok=True)
        current = self.jobs.get(job.uuid)
        if current is None or current.status is not JobStatus.TRAINING:  # canceled at the last moment
            shutil.rmtree(staging, ignore_errors=True)
            return
        os.rename(staging, target)
        self.jobs.complete(job.uuid)
        log.info("fine-tune job %s completed: %s/%d is served from %s", job.uuid, job.repo, job.tag, target)

    def _train(self, job_uuid: str, spec: TrainSpec) -> Optional[str]:
        """Runs the trainer process; None when it finished, else why not."""
        spec_path = self.jobs.work_dir / job_uuid / "spec.json"
        spec_path.write_text(spec.to_json())
        stderr_path = self.jobs.work_dir / job_uuid / "trainer.log"
        with open(stderr_path, "wb") as stderr:
            proc = subprocess.Popen([sys.executable, "-m", "server.control.trainer", str(spec_path)],
                                    stdout=subprocess.PIPE, stderr=stderr, env=trainer_env(spec),
                                    start_new_session=True)
            if spec.device == "cpu":
                lower_priority(proc.pid)
            watcher = threading.Thread(target=self._kill_when_canceled, args=(job_uuid, proc), daemon=True)
            watcher.start()
            result = self._read_events(job_uuid, proc)
            proc.wait()
        return self._outcome(job_uuid, proc.returncode, result, stderr_path)

    def _read_events(self, job_uuid: str, proc: subprocess.Popen) -> dict:
        result: dict = {}
        for line in proc.stdout:
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                continue  # a stray print from a library: the protocol lines are JSON
            if event.get("event") in ("done", "error"):
                result = event
            self.jobs.feed.add(job_uuid, event)
            log_progress(job_uuid, event)
        return result

    def _outcome(self, job_uuid: str, returncode: int, result: dict, stderr_path: Path) -> Optional[str]:
        job = self.jobs.get(job_uuid)
        if job is not None and job.status is JobStatus.CANCELED:
            return "canceled by the user"
        if self._stop.is_set():
            return "the server stopped while this job was training; create it again"
        if returncode == 0 and result.get("event") == "done":
            return None
        if result.get("event") == "error":
            return result.get("message") or "training failed"
        if returncode < 0:
            killed = signal.Signals(-returncode).name
            return f"the training process was killed ({killed}); out of memory is the usual cause"
        return f"the training process exited with status {returncode}: {last_line(stderr_path)}"

    def _kill_when_canceled(self, job_uuid: str, proc: subprocess.Popen) -> None:
        while proc.poll() is None:
            job = self.jobs.get(job_uuid)
            if self._stop.is_set() or job is None or job.status is JobStatus.CANCELED:
                stop_process_group(proc, self.KILL_GRACE_S)
                return
            time.sleep(self.POLL_S)


def trainer_env(spec: TrainSpec) -> dict[str, str]:
    threads = str(max(1, spec.threads))
    return {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "TOKENIZERS_PARALLELISM": "false",
            "PYTHONUNBUFFERED": "1"}


def lower_priority(pid: int) -> None:
    """On CPU the trainer shares the cores with serving: the engine thread wins any contention. Set
    right after the start, long before the child has imported torch and made its threads (which
    inherit it)."""
    try:
        os.setpriority(os.PRIO_PROCESS, pid, 10)
    except OSError as exc:
        log.warning("could not lower the trainer's priority: %s", exc)


def stop_process_group(proc: subprocess.Popen, grace_s: float) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def last_line(path: Path) -> str:
    try:
        lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return "no output"
    return lines[-1][-500:] if lines else "no output"


def log_progress(job_uuid: str, event: dict) -> None:
    """The server's log shows a job moving: its start, each epoch's checkpoint, and every 10th step."""
    kind = event.get("event")
    if kind == "started":
        log.info("fine-tune job %s: %d steps (%d per epoch) over %d training rows, %d evaluation rows", job_uuid,
                 event.get("total_steps", 0), event.get("steps_per_epoch", 0), event.get("train_rows", 0),
                 event.get("evaluation_rows", 0))
    elif kind == "progress" and (event.get("step", 0) % 10 == 0 or event.get("step") == event.get("total_steps")):
        log.info("fine-tune job %s: step %s/%s, loss %.4f", job_uuid, event.get("step"), event.get("total_steps"),
                 event.get("loss") or 0.0)
    elif kind == "checkpoint":
        log.info("fine-tune job %s: checkpoint %s (epoch %s), train loss %.4f, validation loss %s", job_uuid,
                 event.get("checkpoint"), event.get("epoch"), event.get("train_loss") or 0.0,
                 event.get("validation_loss"))
