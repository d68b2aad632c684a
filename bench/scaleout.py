"""What Ray Serve costs and gives: one plain server vs `loraserve serve-ray` with 1 and 2 replicas
(1 thread each), on this machine. Reports the latency the gateway adds to a 1-token /generate (p50
of sequential requests), resident memory (the plain server; the whole local Ray cluster; each
replica), and aggregate decode throughput of concurrent streams. Results go to
bench/results/scaleout-<timestamp>.json.

    .venv/bin/python bench/scaleout.py --requests 40 --concurrency 16 --max-new-tokens 64
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.loadgen import run_scenario  # noqa: E402
from bench.throughput import machine  # noqa: E402
from tests.conftest import ServerProcess, free_port  # noqa: E402

ENGINE_FLAGS = ["--threads", "1", "--max-batch-size", "8", "--kv-cache-memory-mb", "256"]


def start_ray(replicas: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "RAY_TMPDIR": tempfile.mkdtemp(prefix="lsray-", dir="/tmp"), "RAY_USAGE_STATS_ENABLED": "0"}
    proc = subprocess.Popen([sys.executable, "-m", "server", "serve-ray", "--port", str(port), "--dtype", "float32",
                             "--replicas", str(replicas), "--num-cpus", "2", *ENGINE_FLAGS], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/v2/deployments/default", timeout=5).json()["data"]["currentReplicas"] == replicas:
                return proc, url
        except (httpx.HTTPError, ValueError, KeyError, TypeError):
            pass
        time.sleep(1)
    os.killpg(proc.pid, signal.SIGKILL)
    raise TimeoutError("serve-ray did not start")


def latency_ms(url: str, requests: int) -> dict:
    body = {"inputs": "Hello", "parameters": {"max_new_tokens": 1}}
    with httpx.Client(base_url=url, timeout=60) as client:
        client.post("/generate", json=body)
        times = []
        for _ in range(requests):
            start = time.perf_counter()
            assert client.post("/generate", json=body).status_code == 200
            times.append(1000 * (time.perf_counter() - start))
    return {"p50_ms": round(statistics.median(times), 1), "min_ms": round(min(times), 1)}


def rss_mb(pids: list[int]) -> float:
    return round(sum(psutil.Process(p).memory_info().rss for p in pids if psutil.pid_exists(p)) / 2**20)


def measure(url: str, args) -> dict:
    result = {"latency_1_token": latency_ms(url, args.requests)}
    scenario = asyncio.run(run_scenario(url, args.concurrency, args.max_new_tokens, rounds=1))
    result["throughput"] = scenario.__dict__
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=40, help="sequential 1-token requests for the latency")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    results = {"machine": machine(), "args": vars(args) | {"out": None}, "engine_flags": ENGINE_FLAGS}

    direct = ServerProcess(*ENGINE_FLAGS).wait_ready()
    try:
        results["direct"] = measure(direct.url, args) | {"rss_mb": rss_mb([direct.proc.pid])}
    finally:
        direct.stop()
    for replicas in (1, 2):
        proc, url = start_ray(replicas)
        try:
            measured = measure(url, args)
            pids = [r["pid"] for r in httpx.get(url + "/v2/deployments/default", timeout=30).json()["data"]["replicas"]]
            cluster = [proc.pid, *(p.pid for p in psutil.Process(proc.pid).children(recursive=True))]
            results[f"ray_{replicas}"] = measured | {"replica_rss_mb": [rss_mb([p]) for p in pids],
                                                     "cluster_rss_mb": rss_mb(cluster)}
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=120)
    out = args.out or ROOT / "bench" / "results" / f"scaleout-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
