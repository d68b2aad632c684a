"""Shared fixtures: the real default model in-process, engines built on it, and a real HTTP server."""
# ruff: noqa: E402  (Triton's mode is set before anything imports Triton: peft does)

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():  # the CUDA LoRA kernels run on CPU tensors in Triton's interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")  # (tests/test_lora_triton.py; CPU servers never use them)

import asyncio
import gc
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Iterator

import httpx
import pytest

from server.config import AdapterConfig, Limits, ModelConfig, Settings
from server.engine.async_engine import AsyncEngine, GenerationInput
from server.engine.builder import build_engine
from server.engine.request import FinishReason, SamplingParams
from server.model.loader import LoadedModel, load_model
from tests.adapter_factory import SPECS, corrupt_copy, foreign_copy, make_peft_adapter, peft_greedy

ROOT = Path(__file__).resolve().parent.parent
ADAPTER_PROMPTS = ["What is machine learning?", "Once upon a time, in a small village,"]
NEW_TOKENS = 32


@pytest.fixture(scope="session")
def loaded() -> LoadedModel:
    return load_model(ModelConfig(model="default", device="cpu", dtype="float32"))


@pytest.fixture
def make_engine(loaded: LoadedModel):
    engines: list[AsyncEngine] = []

    def make(adapters: AdapterConfig | None = None, model: dict | None = None, **limit_overrides) -> AsyncEngine:
        """model: ModelConfig overrides (kv_cache, prefix_caching, ...)."""
        settings = Settings(limits=replace(Limits(), **limit_overrides), adapters=adapters or AdapterConfig(),
                            model=replace(ModelConfig(), **(model or {})))
        engine = build_engine(settings, loaded)
        engine.engine.start()
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.engine.stop()
    engines.clear()
    gc.collect()  # each engine holds a KV pool (and maybe an adapter pool) of ~1 GB: free them now


def greedy(prompt: str, max_new_tokens: int = 16, **kw) -> GenerationInput:
    return GenerationInput(prompt=prompt, params=SamplingParams(), max_new_tokens=max_new_tokens, **kw)


async def collect(engine: AsyncEngine, inp: GenerationInput) -> tuple[list[int], FinishReason, str]:
    """Run one request to the end; returns (token ids, finish reason, text)."""
    handle = await engine.submit(inp)
    reason = None
    async for event in handle:
        reason = event.finish_reason or reason
        if event.error:
            raise RuntimeError(event.error)
    return list(handle.request.output_ids), reason, handle.request.output_text


def run(coro):
    return asyncio.run(coro)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, *extra_args: str, env: dict[str, str] | None = None, dtype: str = "float32") -> None:
        """dtype: float32 by default, so outputs match the in-process fp32 references; benchmarks pass auto."""
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "server", "serve", "--host", "127.0.0.1", "--port", str(self.port),
               "--dtype", dtype, *extra_args]
        self.log = open(ROOT / ".pytest_cache" / f"server-{self.port}.log", "w") if (ROOT / ".pytest_cache").is_dir() \
            else subprocess.DEVNULL
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **(env or {})},
                                     stdout=self.log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 240.0) -> "ServerProcess":
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise TimeoutError("server did not become healthy")

    def stop(self) -> None:
        stop_process(self.proc)


def stop_process(proc: subprocess.Popen, timeout: float = 20) -> None:
    """SIGTERM (a graceful drain), then SIGKILL if it has not exited within `timeout` seconds."""
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """A real S3-compatible server (moto in standalone mode) on a free loopback port."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            httpx.get(url, timeout=1)
            break
        except httpx.HTTPError:
            time.sleep(0.2)
    yield url
    proc.terminate()
    proc.wait(timeout=10)


S3_ENV = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="session")
def hf_cache(tmp_path_factory, adapter_root) -> Path:
    """A populated Hugging Face hub cache holding one adapter, as a download would leave it."""
    cache = tmp_path_factory.mktemp("hf") / "hub"
    repo = cache / "models--loraserve-test--mlp-r16"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for f in (adapter_root / SPECS[2].name / "1").iterdir():
        (snapshot / f.name).write_bytes(f.read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return cache


@pytest.fixture(scope="session")
def extra_root(tmp_path_factory, adapter_root) -> Path:
    """A second adapter root for the `local` source."""
    import shutil

    root = tmp_path_factory.mktemp("local-root")
    shutil.copytree(adapter_root / SPECS[0].name / "1", root / "team" / "attn")
    return root


@pytest.fixture(scope="session")
def server(loaded: LoadedModel, adapter_root, s3_endpoint, hf_cache, extra_root) -> Iterator[ServerProcess]:
    """A real server on a free loopback port, serving the test adapters from every source."""
    (ROOT / ".pytest_cache").mkdir(exist_ok=True)
    env = {"LORASERVE_ADAPTERS_DIR": str(adapter_root), "LORASERVE_ADAPTER_ROOTS": str(extra_root),
           "S3_ENDPOINT_URL": s3_endpoint, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(hf_cache),
           "LORASERVE_HOME": str(extra_root.parent / "home"), **S3_ENV}
    (extra_root.parent / "home").mkdir()
    os.symlink(loaded.model_dir.parent, extra_root.parent / "home" / "models", target_is_directory=True)
    proc = ServerProcess("--max-concurrent-requests", "16", "--max-batch-size", "8", "--log-format", "json",
                         env=env).wait_ready()
    yield proc
    proc.stop()


@pytest.fixture(scope="session")
def client(server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=120) as c:
        yield c


@pytest.fixture(scope="session")
def adapter_root(tmp_path_factory, loaded) -> Path:
    root = tmp_path_factory.mktemp("adapters")
    for spec in SPECS:
        make_peft_adapter(loaded.model_dir, root / spec.name / "1", spec)
    shutil.copytree(ROOT / "adapters_cache" / "demo-terse", root / "demo-terse")  # answers briefly, then stops
    corrupt_copy(root / SPECS[0].name / "1", root / "corrupt" / "1")
    foreign_copy(root / SPECS[0].name / "1", root / "foreign" / "1")
    return root


@pytest.fixture(scope="session")
def references(adapter_root, loaded) -> dict[tuple[str | None, str], list[int]]:
    """peft's own greedy output for every (adapter, prompt), each adapter alone."""
    refs = {}
    for name in [None, *(s.name for s in SPECS)]:
        for prompt in ADAPTER_PROMPTS:
            ids = loaded.tokenizer(prompt)["input_ids"]
            adapter_dir = adapter_root / name / "1" if name else None
            refs[(name, prompt)] = peft_greedy(loaded.model_dir, adapter_dir, ids, NEW_TOKENS)
    return refs


def metrics_of(url: str) -> dict[tuple[str, tuple], float]:
    """One /metrics scrape as {(sample name, sorted labels): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(url + "/metrics", timeout=30).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def metric(url: str, name: str, **labels: str) -> float:
    return metrics_of(url).get((name, tuple(sorted(labels.items()))), 0.0)


def wait_until(condition, timeout: float, period: float = 0.05) -> float:
    """Poll until `condition()` is true; returns the seconds it took, or fails the test at `timeout`."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout:
            pytest.fail(f"condition not met within {timeout} s")
        time.sleep(period)
    return time.monotonic() - started
