"""Datasets as the SDK uploads them: a pre-signed PUT of the file, then a register call that checks
every row (`dataset_files.summarize`) and answers `connected` or a `lastError` the SDK raises. Files
live under `$LORASERVE_HOME/control/datasets/<uuid>/`; the only connection is `file_uploads`.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import sqlite3
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, Field

from server.adapters.sources import _NAME
from server.control.dataset_files import DatasetFileError, DatasetKind, DatasetSummary, summarize
from server.control.plane import ControlPlane, control_of
from server.control.repos import utc_now
from server.errors import BadRequestError, ConflictError, NotFoundError

router = APIRouter(tags=["control"])
CONNECTION = "file_uploads"
UPLOAD_TTL_S = 3600.0

SCHEMA = """
CREATE TABLE IF NOT EXISTS datasets (uuid TEXT PRIMARY KEY, name TEXT NOT NULL UNIQUE, file_name TEXT NOT NULL,
                                     path TEXT NOT NULL, status TEXT NOT NULL, last_error TEXT, summary TEXT,
                                     created_at TEXT NOT NULL);
"""


@dataclass
class PendingDataset:
    file_name: str
    staging: Path  # the directory the pre-signed PUT writes `file_name` into
    url: str
    expires_at: float = field(default_factory=lambda: time.monotonic() + UPLOAD_TTL_S)


def dataset_name(ref: str) -> str:
    """"file_uploads/name" and "name" both mean the dataset `name`."""
    return ref.removeprefix(CONNECTION + "/")


class DatasetStore:
    def __init__(self, plane: ControlPlane) -> None:
        self.plane, self.db = plane, plane.db
        self.root = plane.root / "datasets"
        self.db.ensure(SCHEMA)
        self._pending: dict[str, PendingDataset] = {}
        shutil.rmtree(self.root / ".staging", ignore_errors=True)  # uploads a restart cut short

    def begin_upload(self, file_name: str, base_url: str) -> dict[str, Any]:
        name = Path(file_name.replace("\\", "/")).name
        if not name or name in (".", "..") or len(name) > 255 or not name.isprintable():
            raise BadRequestError(f"invalid fileName {file_name!r}")
        self._forget_stale()
        token = uuid.uuid4().hex
        staging = self.root / ".staging" / token
        url = self.plane.blobs.issue(base_url, "PUT", staging / name)
        self._pending[token] = PendingDataset(name, staging, url)
        return {"presignedUrl": url, "uploadToken": token, "requiredHeaders": {}}  # must be {}: the SDK's bug

    def register(self, name: str, token: str) -> tuple[PendingDataset, str]:
        """Check the name and the token (without spending it if the name is taken); the upload and its name."""
        name = dataset_name(name)
        if len(name) > 128 or not _NAME.match(name):
            raise BadRequestError(f"invalid dataset name {name!r}: use letters, digits, '.', '_' and '-'")
        pending = self._pending.get(token)
        if pending is None or pending.expires_at < time.monotonic():
            raise NotFoundError("unknown, expired or already used upload token: upload the file again")
        if self._connected(name):
            raise ConflictError(f"dataset {name!r} already exists: choose another name")
        if not (pending.staging / pending.file_name).is_file():
            raise BadRequestError("nothing was uploaded to the presignedUrl yet")
        del self._pending[token]
        self.plane.blobs.revoke(pending.url)
        return pending, name

    def store(self, pending: PendingDataset, name: str, summary: Optional[DatasetSummary],
              error: Optional[str]) -> dict[str, Any]:
        """Move the checked file into place and record it; a failed one replaces an earlier failure."""
        dataset_uuid = str(uuid.uuid4())
        folder = self.root / dataset_uuid
        folder.parent.mkdir(parents=True, exist_ok=True)
        pending.staging.rename(folder)
        try:
            with self.db.transaction() as conn:
                old = conn.execute("SELECT path FROM datasets WHERE name = ? AND status != 'connected'",
                                   (name,)).fetchone()
                conn.execute("DELETE FROM datasets WHERE name = ? AND status != 'connected'", (name,))
                conn.execute("INSERT INTO datasets VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                             (dataset_uuid, name, pending.file_name, str(folder / pending.file_name),
                              "connected" if summary else "errored", error, _summary_json(summary), utc_now()))
        except sqlite3.IntegrityError:  # the same name registered meanwhile
            shutil.rmtree(folder, ignore_errors=True)
            raise ConflictError(f"dataset {name!r} already exists: choose another name") from None
        if old:
            shutil.rmtree(Path(old[0]).parent, ignore_errors=True)
        return self.get(name)

    def _connected(self, name: str) -> bool:
        return self.db.one("SELECT 1 FROM datasets WHERE name = ? AND status = 'connected'", (name,)) is not None

    def _row(self, ref: str) -> dict[str, Any]:
        ref = dataset_name(ref)
        row = self.db.one("SELECT * FROM datasets WHERE name = ? OR uuid = ?", (ref, ref))
        if row is None:
            raise NotFoundError(f"dataset {ref!r} not found")
        return row

    def get(self, ref: str) -> dict[str, Any]:
        row = self._row(ref)
        summary = json.loads(row["summary"]) if row["summary"] else {}
        return {"uuid": row["uuid"], "name": row["name"], "connection": {"type": "file", "name": CONNECTION},
                "status": row["status"], "lastError": row["last_error"], "fileName": row["file_name"],
                "rows": summary.get("rows"), "kind": summary.get("kind"), "createdAt": row["created_at"]}

    def download_link(self, ref: str, base_url: str) -> dict[str, Any]:
        row = self._row(ref)
        url = self.plane.blobs.issue(base_url, "GET", Path(row["path"]), download_name=row["file_name"])
        return {"url": url, "fileExtension": Path(row["file_name"]).suffix.lstrip(".")}

    def dataset_file(self, name: str) -> tuple[Path, str, DatasetSummary]:
        """For fine-tuning and batch jobs: a connected dataset's file, its name as uploaded (which
        decides its format) and what it holds. NotFoundError / BadRequestError otherwise."""
        row = self._row(name)
        if row["status"] != "connected":
            raise BadRequestError(f"dataset {row['name']!r} is not usable: {row['last_error']}")
        data = json.loads(row["summary"])
        summary = DatasetSummary(DatasetKind(data["kind"]), data["rows"], data["train_rows"],
                                 data["evaluation_rows"], tuple(data["columns"]))
        return Path(row["path"]), row["file_name"], summary

    def _forget_stale(self) -> None:
        now = time.monotonic()
        for token, pending in list(self._pending.items()):
            if pending.expires_at < now:
                del self._pending[token]
                shutil.rmtree(pending.staging, ignore_errors=True)


def _summary_json(summary: Optional[DatasetSummary]) -> Optional[str]:
    if summary is None:
        return None
    return json.dumps({"kind": summary.kind.value, "rows": summary.rows, "train_rows": summary.train_rows,
                       "evaluation_rows": summary.evaluation_rows, "columns": list(summary.columns)})


def check_file(path: Path, file_name: str) -> tuple[Optional[DatasetSummary], Optional[str]]:
    """(summary, None) for a usable file, (None, the reason) otherwise."""
    try:
        return summarize(path, file_name), None
    except DatasetFileError as exc:
        return None, str(exc)


# -- routes ---------------------------------------------------------------------------------------
class BeginDatasetUpload(BaseModel):
    file_name: str = Field(alias="fileName")
    mime_type: Optional[str] = Field(None, alias="mimeType")  # says nothing (.jsonl is text/plain): ignored
    region: Optional[str] = None


class RegisterDataset(BaseModel):
    name: str
    upload_token: str = Field(alias="uploadToken")


@router.post("/v2/datasets/upload")
async def begin_dataset_upload(body: BeginDatasetUpload, request: Request) -> dict:
    plane = control_of(request)
    return plane.datasets.begin_upload(body.file_name, plane.base_url(request))


@router.put("/v2/datasets/upload")
async def register_dataset(body: RegisterDataset, request: Request) -> dict:
    store = control_of(request).datasets
    pending, name = store.register(body.name, body.upload_token)
    summary, error = await asyncio.to_thread(check_file, pending.staging / pending.file_name, pending.file_name)
    return store.store(pending, name, summary, error)


@router.get("/v1/datasets/name/{name}")
async def get_dataset(name: str, request: Request, connection_name: str = Query(CONNECTION, alias="connectionName")
                      ) -> dict:
    if connection_name != CONNECTION:
        raise NotFoundError(f"connection {connection_name!r} not found: this server has only {CONNECTION!r}")
    return control_of(request).datasets.get(name)


@router.get("/v2/datasets/{ref:path}/download-link")
async def dataset_download_link(ref: str, request: Request) -> dict:
    plane = control_of(request)
    return plane.datasets.download_link(ref, plane.base_url(request))
