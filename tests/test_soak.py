"""Soak: thousands of short requests (in the long mode) across dozens of adapters, with two device
slots and four CPU-tier places so adapters are evicted and reloaded all the time. Every request must
come back right, and the server's resident memory after warm-up must stay flat.

The default run is short (LORASERVE_SOAK_REQUESTS, default 300: about a minute on 2 cores); the long
run (LORASERVE_SOAK_REQUESTS=3000 .venv/bin/python -m pytest -m soak -s) and its numbers are in
docs/reliability.md.
"""

import os
import re
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.adapter_factory import AdapterSpec, make_peft_adapter, variant_copy
from tests.conftest import ServerProcess, metric

REQUESTS = int(os.environ.get("LORASERVE_SOAK_REQUESTS", "300"))
ADAPTERS = 24
CONCURRENCY = 8
NEW_TOKENS = 3
WARM_UP = 0.25  # the share of requests after which memory must stop growing
RSS_SLACK_MB = 64  # allocator noise is a few MB; leaking an adapter (0.9 MB here) or a request's tensors on
# every request would pass this within a few hundred requests
PROMPTS = ["What is machine learning?", "Once upon a time,", "The capital of France is", "def fib(n):"]


@pytest.fixture(scope="module")
def soak_server(loaded, tmp_path_factory):
    root = tmp_path_factory.mktemp("soak-adapters")
    first = make_peft_adapter(loaded.model_dir, root / "soak-00" / "1",
                              AdapterSpec("soak", 4, 8, ("q_proj", "v_proj"), seed=7))
    for i in range(1, ADAPTERS):
        variant_copy(first, root / f"soak-{i:02d}" / "1", seed=100 + i)
    proc = ServerProcess("--max-active-adapters", "2", "--max-cpu-adapters", "4", "--max-batch-size", "8",
                         "--max-concurrent-requests", "64", env={"LORASERVE_ADAPTERS_DIR": str(root)})
    yield proc.wait_ready()
    proc.stop()


def rss_mb(pid: int) -> float:
    status = open(f"/proc/{pid}/status").read()
    return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) / 1024


def one_request(client: httpx.Client, i: int) -> str | None:
    """Send request i; None if it came back right, else what was wrong."""
    adapter = f"soak-{i % ADAPTERS:02d}/1"
    prompt = PROMPTS[i % len(PROMPTS)]
    if i % 5 == 4:  # every fifth through the OpenAI route
        r = client.post("/v1/completions", json={"model": adapter, "prompt": prompt, "max_tokens": NEW_TOKENS,
                                                 "ignore_eos_token": True, "temperature": 0})
        ok = r.status_code == 200 and r.json()["usage"]["completion_tokens"] == NEW_TOKENS
    else:
        r = client.post("/generate", json={"inputs": prompt, "parameters": {
            "max_new_tokens": NEW_TOKENS, "ignore_eos_token": True, "adapter_id": adapter, "details": True}})
        ok = r.status_code == 200 and r.json()["details"]["generated_tokens"] == NEW_TOKENS \
            and r.headers["x-adapter-id"] == adapter
    return None if ok else f"request {i} ({adapter}): {r.status_code} {r.text[:200]}"


@pytest.mark.soak
@pytest.mark.timeout(max(600, REQUESTS))
def test_soak_many_adapters_with_eviction_churn_keeps_memory_flat(soak_server):
    url, pid = soak_server.url, soak_server.proc.pid
    samples: list[tuple[int, float]] = []
    started = time.monotonic()
    with httpx.Client(base_url=url, timeout=120, limits=httpx.Limits(max_connections=CONCURRENCY)) as client, \
            ThreadPoolExecutor(CONCURRENCY) as pool:
        futures = [pool.submit(one_request, client, i) for i in range(REQUESTS)]
        problems = []
        for done, future in enumerate(futures, 1):
            problems += [p for p in [future.result()] if p]
            if done % max(1, REQUESTS // 20) == 0:
                samples.append((done, rss_mb(pid)))
    elapsed = time.monotonic() - started
    assert not problems, problems[:5]

    warm = next(mb for done, mb in samples if done >= REQUESTS * WARM_UP)
    peak_after_warm_up = max(mb for done, mb in samples if done >= REQUESTS * WARM_UP)
    print(f"\nsoak: {REQUESTS} requests in {elapsed:.0f} s ({REQUESTS / elapsed:.1f}/s); RSS MB after warm-up "
          f"{warm:.0f}, peak {peak_after_warm_up:.0f}, end {samples[-1][1]:.0f}; samples {samples}")
    assert peak_after_warm_up - warm < RSS_SLACK_MB, samples
    assert metric(url, "loraserve_adapter_events_total", tier="device", event="eviction") >= REQUESTS / 10
    assert metric(url, "loraserve_adapter_events_total", tier="cpu", event="eviction") >= ADAPTERS
    assert metric(url, "loraserve_in_flight_requests") == 0 and metric(url, "loraserve_kv_slots_used") == 0
