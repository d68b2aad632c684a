"""Repos and their versions (adapters), stored where the pbase source serves them from:
`adapters_dir/<repo>/<tag>/`. The directories are the truth for what exists (a hand-copied one shows
up as a version); the database adds what a directory can't say: uuids, descriptions, archived flags,
the job writing a version, and a tag counter per repo that never goes back, so a cache never holds
stale weights under a reused id.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import tempfile
import time
import uuid
import zipfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

import torch
from fastapi import APIRouter, Query, Request
from fastapi import Path as PathParam
from fastapi.responses import FileResponse
from pydantic import BaseModel, Field
from safetensors.torch import save_file
from starlette.background import BackgroundTask

from server.adapters.sources import _NAME
from server.adapters.weights import AdapterKey, read_adapter
from server.api.native import engine_of
from server.control.plane import ControlPlane, control_of
from server.errors import BadRequestError, ConflictError, ForbiddenError, NotFoundError, ServingError

router = APIRouter(tags=["control"])
CREATED_BY = "loraserve"
UPLOAD_FILES = ("adapter_config.json", "adapter_model.bin", "adapter_model.safetensors")
RUNNING = ("queued", "training")  # job statuses during which a version's directory is still to come
UPLOAD_TTL_S = 3600.0
Tag = PathParam(ge=1, lt=2**62)  # SQLite integers are 64-bit

SCHEMA = """
CREATE TABLE IF NOT EXISTS repos (uuid TEXT PRIMARY KEY, name TEXT NOT NULL UNIQUE, description TEXT,
                                  created_at TEXT NOT NULL);
-- outlives its repo: a repo deleted and made again never hands out an old tag
CREATE TABLE IF NOT EXISTS repo_tags (name TEXT PRIMARY KEY, next_tag INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS versions (repo TEXT NOT NULL, tag INTEGER NOT NULL, base_model TEXT NOT NULL,
                                     description TEXT, created_at TEXT NOT NULL, created_by TEXT NOT NULL,
                                     archived INTEGER NOT NULL DEFAULT 0, job_uuid TEXT,
                                     PRIMARY KEY (repo, tag));
"""


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


def _utc(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, timezone.utc).isoformat().replace("+00:00", "Z")


def check_repo_name(name: str) -> str:
    if not isinstance(name, str) or len(name) > 128 or not _NAME.match(name):
        raise BadRequestError(f"invalid repo name {name!r}: use letters, digits, '.', '_' and '-', "
                              "starting with a letter or digit (at most 128 characters)")
    return name


@dataclass
class PendingUpload:
    repo: str
    staging: Path
    urls: dict[str, str]
    expires_at: float = field(default_factory=lambda: time.monotonic() + UPLOAD_TTL_S)


class RepoStore:
    def __init__(self, plane: ControlPlane) -> None:
        self.plane, self.db, self.root = plane, plane.db, plane.adapters_dir
        self.db.ensure(SCHEMA)
        self._uploads: dict[str, PendingUpload] = {}
        for leftover in plane.staging_dir.glob("upload-*"):  # uploads a restart cut short (tokens live in memory)
            shutil.rmtree(leftover, ignore_errors=True)

    # -- disk ⇄ database -----------------------------------------------------------------------------
    def version_dir(self, repo: str, tag: int) -> Path:
        """Where version `tag` of `repo` lives (and where a finished fine-tune renames its output)."""
        return self.root / repo / str(tag)

    def _disk_tags(self, repo: str) -> list[int]:
        folder = self.root / repo
        if not folder.is_dir():
            return []
        return sorted(int(p.name) for p in folder.iterdir() if p.is_dir() and p.name.isdigit())

    def sync(self) -> None:
        """Repo directories dropped in by hand become repos; their numbered directories, versions."""
        if self.root.is_dir():
            for folder in sorted(self.root.iterdir()):
                if folder.is_dir() and _NAME.match(folder.name) and len(folder.name) <= 128:
                    self._ensure_repo(folder.name, None)
        for repo in self.db.all("SELECT name FROM repos"):
            self._sync_versions(repo["name"])

    def _sync_versions(self, repo: str) -> None:
        on_disk = set(self._disk_tags(repo))
        rows = {r["tag"]: r for r in self.db.all("SELECT tag, job_uuid FROM versions WHERE repo = ?", (repo,))}
        for tag in on_disk - set(rows):
            path = self.version_dir(repo, tag)
            self.db.execute("INSERT OR IGNORE INTO versions (repo, tag, base_model, created_at, created_by) "
                            "VALUES (?, ?, ?, ?, ?)", (repo, tag, _base_model_of(path), _utc(path.stat().st_mtime),
                                                       CREATED_BY))
        for tag, row in rows.items():
            if tag not in on_disk and row["job_uuid"] is None:  # removed by hand
                self.db.execute("DELETE FROM versions WHERE repo = ? AND tag = ?", (repo, tag))
        if on_disk:
            self.db.execute("INSERT INTO repo_tags (name, next_tag) VALUES (?, ?) ON CONFLICT(name) DO UPDATE "
                            "SET next_tag = max(next_tag, excluded.next_tag)", (repo, max(on_disk) + 1))

    def _ensure_repo(self, name: str, description: Optional[str]) -> dict[str, Any]:
        self.db.execute("INSERT OR IGNORE INTO repos (uuid, name, description, created_at) VALUES (?, ?, ?, ?)",
                        (str(uuid.uuid4()), name, description, utc_now()))
        return self.db.one("SELECT * FROM repos WHERE name = ?", (name,))

    # -- repos ------------------------------------------------------------------------------------
    def create(self, name: str, description: Optional[str], exists_ok: bool) -> dict[str, Any]:
        check_repo_name(name)
        self.sync()
        if self.db.one("SELECT 1 FROM repos WHERE name = ?", (name,)) and not exists_ok:
            raise ConflictError(f"repo {name!r} already exists (pass exists_ok=True to reuse it)")
        self._ensure_repo(name, description)
        return self.repo(name)

    def find(self, ref: str) -> dict[str, Any]:
        """A repo by name or uuid."""
        self.sync()
        row = self.db.one("SELECT * FROM repos WHERE name = ? OR uuid = ?", (ref, ref))
        if row is None:
            raise NotFoundError(f"repo {ref!r} not found")
        return row

    def repo(self, ref: str) -> dict[str, Any]:
        row = self.find(ref)
        return {"uuid": row["uuid"], "name": row["name"], "description": row["description"],
                "createdAt": row["created_at"], "versions": self.versions(row["name"])}

    def list(self, limit: int) -> list[dict[str, Any]]:
        self.sync()
        names = [r["name"] for r in self.db.all("SELECT name FROM repos ORDER BY created_at DESC, name LIMIT ?",
                                                (limit,))]
        return [self.repo(name) for name in names]

    def delete(self, ref: str) -> list[AdapterKey]:
        """Remove a repo and every version's directory; the adapter keys to unload."""
        name = self.find(ref)["name"]
        if self.plane.repo_busy(name):
            raise ForbiddenError(f"repo {name!r} has a fine-tuning job queued or training: cancel it first")
        tags = {r["tag"] for r in self.db.all("SELECT tag FROM versions WHERE repo = ?", (name,))}
        tags |= set(self._disk_tags(name))
        shutil.rmtree(self.root / name, ignore_errors=True)
        with self.db.transaction() as conn:
            conn.execute("DELETE FROM versions WHERE repo = ?", (name,))
            conn.execute("DELETE FROM repos WHERE name = ?", (name,))
        return [AdapterKey("pbase", f"{name}/{tag}") for tag in sorted(tags)]

    # -- versions ---------------------------------------------------------------------------------
    def versions(self, repo: str) -> list[dict[str, Any]]:
        """Every version, archived ones included (flagged: the SDK's `repo.versions` hides them)."""
        rows = self.db.all("SELECT * FROM versions WHERE repo = ? ORDER BY tag", (repo,))
        return [{"tag": r["tag"], "createdAt": r["created_at"], "createdBy": r["created_by"],
                 "baseModel": r["base_model"], "archived": bool(r["archived"]), "description": r["description"]}
                for r in rows]

    def _version_row(self, repo: str, tag: int) -> dict[str, Any]:
        name = self.find(repo)["name"]
        row = self.db.one("SELECT * FROM versions WHERE repo = ? AND tag = ?", (name, tag))
        if row is None:
            raise NotFoundError(f"adapter {name}/{tag} not found")
        return row

    def version(self, repo: str, tag: int) -> dict[str, Any]:
        """The Adapter shape, plus the `status` the SDK requires."""
        row = self._version_row(repo, tag)
        path = self.version_dir(row["repo"], tag)
        status, error = self._status(row["job_uuid"], path.is_dir())
        job = {"uuid": row["job_uuid"], "error": error} if row["job_uuid"] else None
        return {"repo": row["repo"], "tag": tag, "archived": bool(row["archived"]), "baseModel": row["base_model"],
                "description": row["description"], "checkpoint": None, "createdAt": row["created_at"],
                "createdBy": row["created_by"], "adapterPath": str(path) if path.is_dir() else None,
                "finetuningJob": job, "status": status}

    def _status(self, job_uuid: Optional[str], exists: bool) -> tuple[str, Optional[str]]:
        if job_uuid is None:
            return "completed", None  # an upload or a hand-made directory
        known = self.plane.job_status(job_uuid)
        if known is not None:
            return known
        if exists:
            return "completed", None
        return "errored", "the fine-tuning job for this version is unknown to this server"

    def set_archived(self, repo: str, tag: int, archived: bool) -> dict[str, Any]:
        row = self._version_row(repo, tag)
        self.db.execute("UPDATE versions SET archived = ? WHERE repo = ? AND tag = ?",
                        (int(archived), row["repo"], tag))
        return self.version(row["repo"], tag)

    def delete_version(self, repo: str, tag: int) -> AdapterKey:
        """Remove the version's directory and row (its tag stays spent); the key to unload."""
        row = self._version_row(repo, tag)
        if row["job_uuid"] and (self.plane.job_status(row["job_uuid"]) or ("",))[0] in RUNNING:
            raise ConflictError(f"adapter {row['repo']}/{tag} is still being trained: cancel the job first")
        shutil.rmtree(self.version_dir(row["repo"], tag), ignore_errors=True)
        self.db.execute("DELETE FROM versions WHERE repo = ? AND tag = ?", (row["repo"], tag))
        return AdapterKey("pbase", f"{row['repo']}/{tag}")

    def _take_tag(self, conn, repo: str) -> int:
        """Inside a transaction: the next tag, above every tag on disk, in the table, or ever handed out."""
        stored = conn.execute("SELECT next_tag FROM repo_tags WHERE name = ?", (repo,)).fetchone()
        in_table = conn.execute("SELECT max(tag) FROM versions WHERE repo = ?", (repo,)).fetchone()[0] or 0
        tag = max(stored[0] if stored else 1, in_table + 1, max(self._disk_tags(repo), default=0) + 1)
        conn.execute("INSERT INTO repo_tags (name, next_tag) VALUES (?, ?) ON CONFLICT(name) DO UPDATE "
                     "SET next_tag = excluded.next_tag", (repo, tag + 1))
        return tag

    def reserve_version(self, repo_name: str, base_model: str, job_uuid: str, description: Optional[str]) -> int:
        """For a fine-tune: a new tag in `repo_name` (made if missing), recorded with the job that will
        write `version_dir(repo, tag)`; the version reports that job's status until then."""
        check_repo_name(repo_name)
        self._ensure_repo(repo_name, None)
        with self.db.transaction() as conn:
            tag = self._take_tag(conn, repo_name)
            conn.execute("INSERT INTO versions (repo, tag, base_model, description, created_at, created_by, job_uuid) "
                         "VALUES (?, ?, ?, ?, ?, ?, ?)",
                         (repo_name, tag, base_model, description, utc_now(), CREATED_BY, job_uuid))
        return tag

    def add_version(self, repo: str, staging: Path, base_model: str, description: Optional[str]) -> int:
        """Move a checked adapter directory into place as the repo's next version (one rename: the id
        never resolves to a half-written directory)."""
        self._ensure_repo(repo, None)
        with self.db.transaction() as conn:
            tag = self._take_tag(conn, repo)
            target = self.version_dir(repo, tag)
            target.parent.mkdir(parents=True, exist_ok=True)
            staging.rename(target)
            conn.execute("INSERT INTO versions (repo, tag, base_model, description, created_at, created_by) "
                         "VALUES (?, ?, ?, ?, ?, ?)", (repo, tag, base_model, description, utc_now(), CREATED_BY))
        return tag

    # -- adapter uploads --------------------------------------------------------------------------
    def begin_upload(self, repo: str, base_url: str) -> dict[str, Any]:
        check_repo_name(repo)
        self._forget_stale_uploads()
        token = uuid.uuid4().hex
        staging = self.plane.staging_dir / f"upload-{token}"
        staging.mkdir(parents=True)
        urls = {name: self.plane.blobs.issue(base_url, "PUT", staging / name) for name in UPLOAD_FILES}
        self._uploads[token] = PendingUpload(repo, staging, urls)
        return {"uploadToken": token, "presignedUrls": urls, "requiredHeaders": {}}

    def take_upload(self, token: str) -> PendingUpload:
        pending = self._uploads.pop(token, None)
        if pending is None or pending.expires_at < time.monotonic():
            raise NotFoundError("unknown, expired or already used upload token: start the upload again")
        for url in pending.urls.values():  # a late PUT must not write into a directory already moved
            self.plane.blobs.revoke(url)
        return pending

    def _forget_stale_uploads(self) -> None:
        now = time.monotonic()
        for token, pending in list(self._uploads.items()):
            if pending.expires_at < now:
                del self._uploads[token]
                shutil.rmtree(pending.staging, ignore_errors=True)


def _base_model_of(path: Path) -> str:
    try:
        return str(json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path") or "")
    except (OSError, ValueError, AttributeError):
        return ""


def prepare_upload(staging: Path, key: AdapterKey, engine) -> None:
    """Make the uploaded files a servable adapter (safetensors only) and check them against the
    served model's architecture; raises BadRequestError with the reason."""
    if not (staging / "adapter_config.json").is_file():
        raise BadRequestError("the upload has no adapter_config.json")
    bin_path, safe_path = staging / "adapter_model.bin", staging / "adapter_model.safetensors"
    if bin_path.is_file() and not safe_path.is_file():
        try:
            tensors = torch.load(bin_path, map_location="cpu", weights_only=True)
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(safe_path))
        except Exception as exc:  # a pickle torch refuses, or not a dict of tensors
            raise BadRequestError(f"adapter_model.bin could not be read as PyTorch weights ({exc})") from None
    bin_path.unlink(missing_ok=True)
    if not safe_path.is_file():
        raise BadRequestError("the upload has neither adapter_model.safetensors nor adapter_model.bin")
    try:
        read_adapter(key, staging, engine.store.arch)
    except ServingError as exc:
        raise BadRequestError(f"adapter rejected: {exc.message}") from None


def zip_directory(directory: Path) -> Path:
    """The directory's files in a temporary zip on disk (streamed from there, never held in memory)."""
    handle = tempfile.NamedTemporaryFile(suffix=".zip", delete=False)
    handle.close()
    with zipfile.ZipFile(handle.name, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(directory.rglob("*")):
            if path.is_file():
                archive.write(path, path.relative_to(directory))
    return Path(handle.name)


# -- routes ---------------------------------------------------------------------------------------
class CreateRepo(BaseModel):
    name: str
    description: Optional[str] = None
    exists_ok: bool = Field(False, alias="existsOk")


class ArchiveBody(BaseModel):
    archived: bool


class BeginAdapterUpload(BaseModel):
    repo: str
    region: Optional[str] = None


class CompleteUpload(BaseModel):
    upload_token: str = Field(alias="uploadToken")


def store_of(request: Request) -> RepoStore:
    return control_of(request).repos


def unload(request: Request, keys: list[AdapterKey]) -> None:
    """Drop deleted versions from the engine's CPU and device tiers (nothing cached while it loads)."""
    engine = getattr(request.app.state, "engine", None)
    for key in keys if engine is not None else ():
        engine.unload_adapter(key)


@router.post("/v2/repos")
async def create_repo(body: CreateRepo, request: Request) -> dict:
    return store_of(request).create(body.name, body.description, body.exists_ok)


@router.get("/v2/repos")
async def list_repos(request: Request, limit: int = Query(10, ge=1, le=10_000)) -> dict:
    return {"data": {"repos": store_of(request).list(limit)}}


@router.get("/v2/repos/{ref}")
async def get_repo(ref: str, request: Request) -> dict:
    return store_of(request).repo(ref)


@router.delete("/v2/repos/{ref}")
async def delete_repo(ref: str, request: Request) -> dict:
    unload(request, store_of(request).delete(ref))
    return {"deleted": ref}


@router.get("/v2/repos/{repo}/version/{tag}")
async def get_version(repo: str, request: Request, tag: int = Tag) -> dict:
    return store_of(request).version(repo, tag)


@router.put("/v2/repos/{repo}/version/{tag}")
async def update_version(repo: str, body: ArchiveBody, request: Request, tag: int = Tag) -> dict:
    return store_of(request).set_archived(repo, tag, body.archived)


@router.delete("/v2/repos/{repo}/version/{tag}")
async def delete_version(repo: str, request: Request, tag: int = Tag) -> dict:
    unload(request, [store_of(request).delete_version(repo, tag)])
    return {"deleted": f"{repo}/{tag}"}


@router.get("/v2/repos/{repo}/version/{tag}/download")
async def download_version(repo: str, request: Request, tag: int = Tag) -> FileResponse:
    version = store_of(request).version(repo, tag)
    if not version["adapterPath"]:
        raise NotFoundError(f"adapter {repo}/{tag} has no files yet (status {version['status']})")
    archive = await asyncio.to_thread(zip_directory, Path(version["adapterPath"]))
    return FileResponse(archive, media_type="application/zip", filename=f"{version['repo']}-{tag}.zip",
                        background=BackgroundTask(archive.unlink, missing_ok=True))


@router.post("/v2/adapters/upload")
async def begin_adapter_upload(body: BeginAdapterUpload, request: Request) -> dict:
    plane = control_of(request)
    return plane.repos.begin_upload(body.repo, plane.base_url(request))


@router.put("/v2/adapters/upload")
@router.put("/v2/adapters/upload/")
async def complete_adapter_upload(body: CompleteUpload, request: Request) -> dict:
    engine = engine_of(request)  # 503 while loading, before the token is spent
    store = store_of(request)
    pending = store.take_upload(body.upload_token)
    try:
        await asyncio.to_thread(prepare_upload, pending.staging, AdapterKey("pbase", f"{pending.repo}/upload"), engine)
        tag = store.add_version(pending.repo, pending.staging, engine.loaded.name, None)
    finally:
        shutil.rmtree(pending.staging, ignore_errors=True)  # gone already when it was moved into place
    return store.version(pending.repo, tag)
