"""Start-up: a server that can't start says why in one line on stderr and exits non-zero within
seconds, without a traceback; one that is still loading says so, and how far, on /health.

Each failure runs the real CLI in a subprocess, as a user (or Docker) would."""

import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch
from fastapi.testclient import TestClient

from server.__main__ import report_start_failure
from server.api.app import create_app
from server.config import Limits, Settings
from server.engine.builder import StartPhase, is_out_of_memory, out_of_memory_message
from server.errors import ExitCode, StartupError
from server.model.default_model import default_model_dir
from tests.conftest import ROOT, ServerProcess, free_port

BOUND_S = 30  # a failing start must be over well within this (most take a few seconds)
PHASES = [phase.value for phase in StartPhase]


def start(*args: str, env: dict[str, str] | None = None, port: int | None = None) -> subprocess.CompletedProcess:
    """Run `loraserve serve` to its end; a server that does not exit by itself fails the test."""
    cmd = [sys.executable, "-m", "server", "serve", "--host", "127.0.0.1", "--port", str(port or free_port()), *args]
    return subprocess.run(cmd, cwd=ROOT, env={**os.environ, **(env or {})}, capture_output=True, text=True,
                          timeout=BOUND_S)


def assert_refused(result: subprocess.CompletedProcess, message: str, before_loading: bool = False) -> None:
    """Exit code 4 and, as the last line on stderr, the reason; no traceback anywhere."""
    assert result.returncode == ExitCode.CANNOT_START, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("loraserve: cannot start: ") and message in last, last
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    if before_loading:  # refused by the pre-flight checks: no model loading was even attempted
        assert "start-up: " not in result.stderr, result.stderr[-3000:]


@pytest.fixture(scope="module")
def default_dir() -> Path:
    return default_model_dir()


def test_a_nonexistent_model_directory_is_refused_before_anything_loads():
    assert_refused(start("--model", "/nonexistent/model"), "no such directory: /nonexistent/model",
                   before_loading=True)


def test_a_relative_path_that_does_not_exist_is_a_directory_not_a_hub_id():
    assert_refused(start("--model", "./no-such-model-dir", env={"HF_HUB_OFFLINE": "1"}),
                   f"no such directory: {ROOT / 'no-such-model-dir'} (", before_loading=True)


def test_a_directory_without_config_json_is_not_a_model(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    assert_refused(start("--model", str(tmp_path)),
                   f"not a Hugging Face model directory (no config.json): {tmp_path}", before_loading=True)


def test_an_unsupported_architecture_is_named(tmp_path, default_dir):
    """A GPT-2 checkout: a tokenizer, a config naming model_type gpt2, weights."""
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(default_dir / name, tmp_path / name)
    config = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_embd": 64, "n_head": 2, "n_layer": 2,
              "vocab_size": 49152}
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "model.safetensors").symlink_to(default_dir / "model.safetensors")
    assert_refused(start("--model", str(tmp_path)), "unsupported model_type 'gpt2'")


def test_corrupt_weights_name_the_directory(tmp_path, default_dir):
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(default_dir / name, tmp_path / name)
    (tmp_path / "model.safetensors").write_bytes(b"\xff" * 64)
    result = start("--model", str(tmp_path))
    assert_refused(result, f"cannot read the weights in {tmp_path} (")
    assert "is corrupt or truncated; download or copy it again" in result.stderr


def test_an_unknown_hub_id_offline_says_what_to_do(tmp_path):
    result = start("--model", "no-such-org/no-such-model", env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path)})
    assert_refused(result, "model 'no-such-org/no-such-model' is not a local directory and could not be fetched")
    assert result.stderr.rstrip().endswith("a local path must start with /, ./, ../ or ~")


def test_a_port_in_use_is_refused_before_anything_loads():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = start(port=port)
    assert_refused(result, f"port {port} on 127.0.0.1 is already in use", before_loading=True)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_device_cuda_without_cuda_is_refused_before_anything_loads():
    assert_refused(start("--device", "cuda"), "--device cuda was requested but", before_loading=True)


def test_float16_on_cpu_is_refused_before_anything_loads():
    assert_refused(start("--device", "cpu", "--dtype", "float16"), "dtype float16 is refused on CPU",
                   before_loading=True)


def test_a_preloaded_adapter_that_does_not_exist_stops_the_start(tmp_path):
    env = {"LORASERVE_ADAPTERS_DIR": str(tmp_path), "LORASERVE_PRELOAD_ADAPTERS": "no-such-adapter/1"}
    result = start("--device", "cpu", "--dtype", "float32", env=env)
    assert_refused(result, "preload_adapters entry 'no-such-adapter/1' failed: adapter no-such-adapter/1 not found")


@pytest.mark.parametrize("layout", ["paged", "dense"])
def test_running_out_of_memory_names_the_sizes_and_the_knob(default_dir, layout):
    """A KV cache far larger than RAM: the paged pool (allocated at start) or the dense cache's first
    block (at warm-up) can't be allocated. The size asks for 4x RAM + swap in one allocation, which
    Linux refuses at once unless it is told to overcommit unconditionally (then the allocation would
    succeed and fill the machine instead)."""
    if Path("/proc/sys/vm/overcommit_memory").read_text().strip() == "1":
        pytest.skip("vm.overcommit_memory=1: a huge allocation would succeed, then exhaust memory")
    meminfo = dict(line.split(":") for line in Path("/proc/meminfo").read_text().splitlines())
    ram_and_swap = sum(int(meminfo[k].split()[0]) * 1024 for k in ("MemTotal", "SwapTotal"))
    if layout == "paged":  # refused before allocating anything
        mb = 4 * ram_and_swap // 2**20
        result = start("--device", "cpu", "--dtype", "float32", "--kv-cache-memory-mb", str(mb))
        assert_refused(result, f"kv_cache_memory_mb ({mb}) is more than the memory available now")
        assert "lower --kv-cache-memory-mb" in result.stderr
        return
    arch = json.loads((default_dir / "config.json").read_text())
    head_dim = arch["hidden_size"] // arch["num_attention_heads"]
    slot_bytes = arch["num_key_value_heads"] * 256 * head_dim * 4  # one layer's keys, first 256-token block, fp32
    slots = 4 * ram_and_swap // slot_bytes
    result = start("--device", "cpu", "--dtype", "float32", "--kv-cache", "dense", "--max-batch-size", str(slots))
    assert_refused(result, "out of memory while warming_up: DefaultCPUAllocator: can't allocate memory")
    assert f"max_batch_size ({slots})" in result.stderr and "lower --max-batch-size" in result.stderr


def test_debug_logging_shows_the_traceback_of_an_expected_failure():
    result = start("--model", "/nonexistent/model", "--log-level", "debug")
    assert result.returncode == ExitCode.CANNOT_START
    assert "Traceback" in result.stderr and "StartupError: no such directory" in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("loraserve: cannot start: no such directory")


def test_a_bad_log_level_is_a_configuration_error():
    result = start(env={"LORASERVE_LOG_LEVEL": "verbose"})
    assert result.returncode == ExitCode.INVALID_CONFIG
    assert "invalid configuration: log level must be one of" in result.stderr


def test_an_unexpected_error_exits_5_with_its_traceback_logged(caplog, capsys):
    try:
        raise KeyError("num_attention_heads")
    except KeyError as exc:
        error = exc
    with caplog.at_level(logging.ERROR):
        assert report_start_failure(error) == ExitCode.START_CRASHED
    assert caplog.records[-1].exc_info[1] is error  # the log handler prints it as a traceback
    assert "loraserve: unexpected error while starting (KeyError: 'num_attention_heads')" in capsys.readouterr().err


def test_health_reports_the_loading_phase_then_the_failure():
    """In-process, with a factory that stops in a phase until told to go on, then fails."""
    proceed, failures = threading.Event(), []

    def factory(settings, *, progress):
        progress(StartPhase.LOADING_WEIGHTS)
        proceed.wait(30)
        raise StartupError("no such directory: /models/x")

    with TestClient(create_app(Settings(), factory, on_load_failure=failures.append)) as client:
        loading = client.get("/health")
        assert loading.status_code == 503
        body = loading.json()
        assert body["error_type"] == "unavailable" and body["status"] == "loading"
        assert body["phase"] == "loading_weights" and body["elapsed_s"] >= 0
        assert "still loading (loading_weights" in body["error"]
        proceed.set()
        deadline = time.monotonic() + 30
        while not failures and time.monotonic() < deadline:
            time.sleep(0.01)
        failed = client.get("/health")
    assert failed.status_code == 503 and failed.json()["status"] == "failed"
    assert failed.json()["error"] == "model failed to load: no such directory: /models/x"
    assert [str(e) for e in failures] == ["no such directory: /models/x"]


def test_a_slow_but_fine_start_says_it_is_loading_then_comes_up():
    """The default model with a preloaded adapter: /health answers 503 with the phase while it
    loads, the phases come in order, then 200."""
    server = ServerProcess("--device", "cpu", env={"LORASERVE_PRELOAD_ADAPTERS": "demo-terse/1"})
    seen: list[dict] = []
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            assert server.proc.poll() is None, f"server exited with {server.proc.returncode}"
            try:
                response = httpx.get(server.url + "/health", timeout=2)
            except httpx.TransportError:  # not listening yet
                time.sleep(0.05)
                continue
            if response.status_code == 200:
                break
            assert response.status_code == 503
            seen.append(response.json())
            time.sleep(0.05)
        assert response.json() == {"status": "ok"}
        ok = httpx.post(server.url + "/generate", json={"inputs": "Hi", "parameters": {
            "max_new_tokens": 2, "adapter_id": "demo-terse/1"}}, timeout=60)
        assert ok.status_code == 200
    finally:
        server.stop()
    assert seen, "never saw /health answer while loading"
    assert all(b["status"] == "loading" and b["error_type"] == "unavailable" for b in seen), seen
    phases = [b["phase"] for b in seen if b["phase"] != "starting"]
    assert phases and phases == sorted(phases, key=PHASES.index), phases


CUDA_OOM = ("CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has a total capacity of 79.19 GiB of which "
            "3.10 GiB is free. Including non-PyTorch memory, this process has 76.08 GiB memory in use. If reserved "
            "but unallocated memory is large try setting PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True")


@pytest.mark.parametrize("phase, expected", [
    (StartPhase.LOADING_WEIGHTS, "out of memory while loading_weights: CUDA out of memory. Tried to allocate "
     "20.00 GiB. GPU 0 has a total capacity of 79.19 GiB of which 3.10 GiB is free; the weights do not fit"),
    (StartPhase.WARMING_UP, "out of memory while warming_up: CUDA out of memory. Tried to allocate 20.00 GiB. "
     "GPU 0 has a total capacity of 79.19 GiB of which 3.10 GiB is free; the KV cache holds max_batch_size (32)"),
])
def test_cuda_out_of_memory_keeps_torchs_sizes_and_names_the_knob(phase, expected):
    """torch's own CUDA message (this machine has no GPU to run out of)."""
    error = torch.OutOfMemoryError(CUDA_OOM)
    assert is_out_of_memory(error)
    assert out_of_memory_message(error, phase, Limits()).startswith(expected)
