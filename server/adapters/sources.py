"""Where adapters come from: one small class per source, all turning an id into a local directory.

pbase (the default) and local read `adapters_cache/<repo>/<version>/` and the configured roots,
never anything outside them; hub goes through huggingface_hub (offline from its cache when
HF_HUB_OFFLINE=1); s3 downloads through boto3 into the disk tier under $LORASERVE_HOME.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import time
from abc import ABC, abstractmethod
from pathlib import Path
from urllib.parse import unquote

from server.adapters.weights import AdapterLoadError, AdapterNotFoundError
from server.errors import ValidationError

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
OPTIONAL_FILES = ("chat_template.jinja", "tokenizer_config.json")


class AdapterSource(ABC):
    name: str
    remote = False  # fetch may download (seconds), rather than find files on a local disk

    @abstractmethod
    def fetch(self, adapter_id: str) -> Path:
        """Return a local directory holding the adapter's files (download if needed)."""

    def list_known(self) -> list[str]:
        """Adapter ids this source can enumerate without a network call (for /v1/models)."""
        return []


def _inside(path: Path, root: Path) -> bool:
    try:
        path.resolve(strict=False).relative_to(root.resolve())
        return True
    except ValueError:
        return False


def _check_id(adapter_id: str) -> str:
    decoded = unquote(adapter_id)
    if not decoded or "\x00" in decoded or ".." in Path(decoded).parts or "\\" in decoded:
        raise ValidationError(f"adapter_id {adapter_id!r} is not a valid adapter id")
    return decoded


class LocalSource(AdapterSource):
    """An adapter directory by path, relative to a root or absolute, but only inside the roots."""

    name = "local"

    def __init__(self, roots: list[Path]) -> None:
        self.roots = [r.resolve() for r in roots]

    def fetch(self, adapter_id: str) -> Path:
        decoded = _check_id(adapter_id)
        path = Path(decoded)
        candidates = [path] if path.is_absolute() else [root / path for root in self.roots]
        for candidate in candidates:
            if not any(_inside(candidate, root) for root in self.roots):
                raise ValidationError(f"adapter_id {adapter_id!r} is outside the configured adapter roots")
            if candidate.is_dir():
                return candidate.resolve()
        raise AdapterNotFoundError(f"adapter {adapter_id} not found in the local adapter roots")


class PbaseSource(AdapterSource):
    """Predibase ids: "repo/version" is adapters_cache/repo/version; "repo" is its highest version."""

    name = "pbase"

    def __init__(self, adapters_dir: Path) -> None:
        self.root = adapters_dir.resolve()

    def canonical(self, adapter_id: str) -> str:
        """"repo" -> "repo/<highest version>" so both spellings share one cache entry."""
        parts = _check_id(adapter_id).split("/")
        if len(parts) not in (1, 2) or not all(_NAME.match(p) for p in parts):
            raise ValidationError(f'adapter_id {adapter_id!r} must look like "repo" or "repo/version"')
        if len(parts) == 2:
            return "/".join(parts)
        repo = self.root / parts[0]
        numbered = [p.name for p in repo.iterdir() if p.is_dir() and p.name.isdigit()] if repo.is_dir() else []
        if not numbered:
            raise AdapterNotFoundError(f"adapter {adapter_id} not found: repository has no versions")
        return f"{parts[0]}/{max(numbered, key=int)}"

    def fetch(self, adapter_id: str) -> Path:
        path = self.root / self.canonical(adapter_id)
        if not path.is_dir():
            raise AdapterNotFoundError(f"adapter {adapter_id} not found")
        if not _inside(path, self.root):  # a symlink that leads out of the store
            raise ValidationError(f"adapter_id {adapter_id!r} resolves outside the adapter store")
        return path.resolve()

    def list_known(self) -> list[str]:
        if not self.root.is_dir():
            return []
        repos = [r for r in self.root.iterdir() if r.is_dir() and _NAME.match(r.name)]  # not .staging/
        return sorted(f"{repo.name}/{v.name}" for repo in repos
                      for v in repo.iterdir() if v.is_dir() and (v / "adapter_config.json").is_file())


class HubSource(AdapterSource):
    """"org/name" or "org/name@revision" through huggingface_hub."""

    name = "hub"
    remote = True

    def fetch(self, adapter_id: str) -> Path:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

        repo_id, _, revision = _check_id(adapter_id).partition("@")
        try:
            local = snapshot_download(repo_id, revision=revision or None,
                                      allow_patterns=list(ADAPTER_FILES + OPTIONAL_FILES))
        except (RepositoryNotFoundError, LocalEntryNotFoundError) as exc:
            raise AdapterNotFoundError(f"adapter {adapter_id} not found on the hub ({type(exc).__name__})") from None
        except (HfHubHTTPError, OSError, ValueError) as exc:
            raise AdapterLoadError(f"adapter {adapter_id}: hub download failed ({exc})") from None
        return Path(local)


class S3Source(AdapterSource):
    """"s3://bucket/prefix" through boto3 (S3_ENDPOINT_URL and AWS_* respected), cached on disk.

    One download is bounded by `timeout_s` in all: every call has connect and read timeouts of a
    third of it (at most 10 s) and two attempts, and the deadline is checked between 64 KiB chunks,
    so an endpoint that is down, hangs, or trickles bytes fails the load (424) instead of holding
    the request, and a load worker, forever.
    """

    name = "s3"
    remote = True
    CHUNK = 64 * 1024

    def __init__(self, cache_dir: Path, timeout_s: float = 300.0) -> None:
        self.cache_dir, self.timeout_s = cache_dir, timeout_s

    def fetch(self, adapter_id: str) -> Path:
        bucket, prefix = self._parse(adapter_id)
        target = self.cache_dir / bucket / prefix
        if all((target / f).is_file() for f in ADAPTER_FILES):
            return target  # disk tier hit
        self._download(adapter_id, bucket, prefix, target)
        return target

    @staticmethod
    def _parse(adapter_id: str) -> tuple[str, str]:
        match = re.match(r"^s3://([a-z0-9][a-z0-9.-]{1,62})/(.+?)/?$", adapter_id)
        if match is None or ".." in match.group(2).split("/"):
            raise ValidationError(f'adapter_id {adapter_id!r} must look like "s3://bucket/prefix"')
        return match.group(1), match.group(2)

    def _client(self):
        import boto3
        from botocore.config import Config

        per_call = max(1.0, min(10.0, self.timeout_s / 3))
        return boto3.client("s3", endpoint_url=os.environ.get("S3_ENDPOINT_URL") or None,
                            config=Config(connect_timeout=per_call, read_timeout=per_call,
                                          retries={"max_attempts": 2, "mode": "standard"}))

    def _download(self, adapter_id: str, bucket: str, prefix: str, target: Path) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        client, deadline = self._client(), time.monotonic() + self.timeout_s
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".s3-", dir=target.parent))
        try:
            for name in ADAPTER_FILES + OPTIONAL_FILES:
                try:
                    self._fetch_file(client, bucket, f"{prefix}/{name}", staging / name, deadline)
                except ClientError as exc:
                    code = exc.response.get("Error", {}).get("Code", "")
                    if name in OPTIONAL_FILES and code in ("404", "NoSuchKey"):
                        continue
                    if code in ("404", "NoSuchKey", "NoSuchBucket"):
                        raise AdapterNotFoundError(f"adapter {adapter_id} not found in S3 ({name})") from None
                    raise AdapterLoadError(f"adapter {adapter_id}: S3 error {code or exc}") from None
            shutil.rmtree(target, ignore_errors=True)
            staging.rename(target)
        except (BotoCoreError, OSError) as exc:
            raise AdapterLoadError(f"adapter {adapter_id}: S3 download failed ({exc})") from None
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _fetch_file(self, client, bucket: str, key: str, dest: Path, deadline: float) -> None:
        def check_deadline() -> None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"took longer than adapter_download_timeout_s ({self.timeout_s:g} s)")

        check_deadline()
        body = client.get_object(Bucket=bucket, Key=key)["Body"]
        try:
            with open(dest, "wb") as out:
                for chunk in body.iter_chunks(self.CHUNK):
                    out.write(chunk)
                    check_deadline()
        finally:
            body.close()
