"""Decode throughput and latency through the HTTP API at several concurrency levels.

Starts its own server on a free loopback port (or uses --url), sends bounded batches of
/generate_stream requests with EOS ignored, and reports aggregate tokens/s, time to first token
and inter-token latency. Results go to bench/results/throughput-<timestamp>.json.

    .venv/bin/python bench/throughput.py --concurrency 1 8 32 --max-new-tokens 64
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.loadgen import run_scenario  # noqa: E402
from tests.conftest import ServerProcess  # noqa: E402  (reuse the test suite's server launcher)


def wait_for_quiet(max_load: float = 1.5, poll_s: float = 20, timeout_s: float = 900) -> float:
    """Wait until the 1-minute load average drops below max_load (this machine is shared; OpenMP
    threads collapse when another process is busy). Returns the load seen when starting."""
    deadline = time.monotonic() + timeout_s
    while os.getloadavg()[0] >= max_load and time.monotonic() < deadline:
        print(f"load average {os.getloadavg()[0]:.2f} >= {max_load}: waiting", file=sys.stderr, flush=True)
        time.sleep(poll_s)
    return round(os.getloadavg()[0], 2)


def machine() -> dict:
    load = os.getloadavg()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "loadavg_1m_at_start": round(load[0], 2), "commit": commit.stdout.strip()}


def save_report(report: dict, out_dir: Path) -> Path:
    """report (its "benchmark" names it) as out_dir/<benchmark>-<timestamp>.json; prints where."""
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / f"{report['benchmark']}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(report, indent=1))
    print(f"saved {out}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="an already running server (default: start one)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=1, help="requests per stream slot")
    parser.add_argument("--server-args", default="", help="extra flags for the started server")
    args = parser.parse_args()

    server = None
    if args.url is None:
        (ROOT / ".pytest_cache").mkdir(exist_ok=True)
        server = ServerProcess(*args.server_args.split(), dtype="auto").wait_ready()
    url = args.url or server.url
    try:
        info = httpx.get(url + "/info", timeout=10).json()
        scenarios = [asyncio.run(run_scenario(url, c, args.max_new_tokens, args.rounds)) for c in args.concurrency]
    finally:
        if server is not None:
            server.stop()
    report = {"benchmark": "throughput", "machine": machine(), "server": info,
              "max_new_tokens": args.max_new_tokens, "command": " ".join(sys.argv),
              "scenarios": [asdict(s) for s in scenarios]}
    out = ROOT / "bench" / "results" / f"throughput-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"{'conc':>5} {'tok/s':>8} {'ttft p50':>9} {'ttft p99':>9} {'itl p50':>8} {'itl p99':>8} {'err':>4}")
    for s in scenarios:
        print(f"{s.concurrency:>5} {s.tokens_per_s:>8} {s.ttft_p50_ms:>9} {s.ttft_p99_ms:>9} "
              f"{s.itl_p50_ms:>8} {s.itl_p99_ms:>8} {s.errors:>4}")
    print(f"saved {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
