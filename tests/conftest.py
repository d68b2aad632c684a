"""Shared fixtures: the real default model in-process, engines built on it, and a real HTTP server."""

from __future__ import annotations

import asyncio
import os
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

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def loaded() -> LoadedModel:
    return load_model(ModelConfig(model="default", device="cpu", dtype="float32"))


@pytest.fixture
def make_engine(loaded: LoadedModel):
    engines: list[AsyncEngine] = []

    def make(adapters: AdapterConfig | None = None, **limit_overrides) -> AsyncEngine:
        settings = Settings(limits=replace(Limits(), **limit_overrides), adapters=adapters or AdapterConfig())
        engine = build_engine(settings, loaded)
        engine.engine.start()
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.engine.stop()


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
    def __init__(self, *extra_args: str, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "server", "serve", "--host", "127.0.0.1", "--port", str(self.port), *extra_args]
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
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="session")
def server(loaded: LoadedModel) -> Iterator[ServerProcess]:
    """A real server on a free loopback port (the model is converted already by `loaded`)."""
    (ROOT / ".pytest_cache").mkdir(exist_ok=True)
    proc = ServerProcess("--max-concurrent-requests", "16", "--max-batch-size", "8").wait_ready()
    yield proc
    proc.stop()


@pytest.fixture(scope="session")
def client(server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=120) as c:
        yield c
