"""Each fine-tuning job's metrics as the SDK's WebSocket messages: kept in order (in memory and in
`<job>/metrics.jsonl`, so a reconnect or a restart replays the whole history), ending with one
`is_completed` message once the job is over.

The 2025.10.3 SDK drops any message whose `checkpoint_number` is 1 or more (a bug in its table code),
so per-step progress goes out with `checkpoint_number: 0` (its progress bar moves), each epoch's
checkpoint with its real number (for fixed SDKs and other readers), and the socket is closed with
1000 at the end, which is what ends the SDK's wait either way.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional


@dataclass
class JobFeed:
    messages: list[dict] = field(default_factory=list)
    total_steps: int = 0
    steps_per_epoch: int = 0
    step: int = 0
    closed: bool = False


class MetricsFeed:
    def __init__(self, work_dir: Path) -> None:
        self.work_dir = work_dir
        self._feeds: dict[str, JobFeed] = {}
        self._lock = threading.Lock()

    def add(self, job_uuid: str, event: dict) -> None:
        """One trainer event (see server/control/trainer.py) in; zero or one SDK message out."""
        with self._lock:
            feed = self._feed(job_uuid)
            if event.get("event") == "started":
                feed.total_steps, feed.steps_per_epoch = event["total_steps"], event["steps_per_epoch"]
                return
            message = self._message(job_uuid, feed, event)
            if message is not None:
                self._append(job_uuid, feed, message)

    def _message(self, job_uuid: str, feed: JobFeed, event: dict) -> Optional[dict]:
        kind = event.get("event")
        if kind == "progress":
            feed.step = event["step"]
            data = {"steps": event["step"], "checkpoint_number": 0, "epoch": event.get("epoch"),
                    "train_metrics_loss": event.get("loss"), "learning_rate": event.get("learning_rate")}
        elif kind == "checkpoint":
            feed.step = event["step"]
            data = {"steps": event["step"], "checkpoint_number": event["checkpoint"], "epoch": event.get("epoch"),
                    "train_metrics_loss": event.get("train_loss"),
                    "validation_metrics_loss": event.get("validation_loss"),
                    "learning_rate": event.get("learning_rate")}
        else:
            return None
        return {"data": data, "meta": self._meta(job_uuid, feed, completed=False)}

    def _meta(self, job_uuid: str, feed: JobFeed, completed: bool) -> dict:
        return {"is_completed": completed, "model_uuid": job_uuid, "run_id": job_uuid, "steps": feed.step,
                "steps_per_epoch": feed.steps_per_epoch, "total_steps": feed.total_steps}

    def close(self, job_uuid: str) -> None:
        """The job is over (any way): the last message says so, and readers stop after it."""
        with self._lock:
            feed = self._feed(job_uuid)
            if feed.closed:
                return
            message = {"data": {"steps": feed.step, "checkpoint_number": 0},
                       "meta": self._meta(job_uuid, feed, completed=True)}
            self._append(job_uuid, feed, message)
            feed.closed = True

    def since(self, job_uuid: str, start: int) -> tuple[list[dict], bool]:
        """Messages from index `start` on, and whether the feed has ended."""
        with self._lock:
            feed = self._feed(job_uuid)
            return feed.messages[start:], feed.closed

    def progress(self, job_uuid: str) -> dict:
        """Where a job stands, for listings: steps done of the total, and the last training loss."""
        with self._lock:
            feed = self._feed(job_uuid)
            losses = [m["data"]["train_metrics_loss"] for m in feed.messages  # per-step ones, not checkpoints' means
                      if m["data"].get("checkpoint_number") == 0 and m["data"].get("train_metrics_loss") is not None]
            return {"steps": feed.step, "totalSteps": feed.total_steps, "loss": losses[-1] if losses else None}

    def _append(self, job_uuid: str, feed: JobFeed, message: dict) -> None:
        feed.messages.append(message)
        path = self.work_dir / job_uuid / "metrics.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as out:
            out.write(json.dumps(message) + "\n")

    def _feed(self, job_uuid: str) -> JobFeed:
        """From memory, else from the job's file (a restarted server replays what it had)."""
        if job_uuid not in self._feeds:
            feed = JobFeed()
            path = self.work_dir / job_uuid / "metrics.jsonl"
            if path.is_file():
                feed.messages = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
                feed.closed = any(m["meta"]["is_completed"] for m in feed.messages)
                if feed.messages:
                    meta = feed.messages[-1]["meta"]
                    feed.step, feed.total_steps, feed.steps_per_epoch = (meta["steps"], meta["total_steps"],
                                                                         meta["steps_per_epoch"])
            self._feeds[job_uuid] = feed
        return self._feeds[job_uuid]
