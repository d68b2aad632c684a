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
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.conftest import ServerProcess  # noqa: E402  (reuse the test suite's server launcher)

PROMPTS = [
    "What is machine learning?",
    "Write a story about a robot learning to paint.",
    "Explain the difference between a list and a tuple in Python.",
    "Give me three tips for a job interview.",
]


@dataclass
class StreamResult:
    tokens: int
    ttft_s: float
    itl_s: list[float]
    total_s: float
    error: str | None = None


@dataclass
class Scenario:
    concurrency: int
    requests: int
    tokens: int
    wall_s: float
    tokens_per_s: float
    ttft_p50_ms: float
    ttft_p99_ms: float
    itl_p50_ms: float
    itl_p99_ms: float
    errors: int


async def one_stream(client: httpx.AsyncClient, prompt: str, max_new_tokens: int,
                     adapter_id: str | None = None) -> StreamResult:
    body = {"inputs": prompt, "parameters": {"max_new_tokens": max_new_tokens, "ignore_eos_token": True,
                                             "adapter_id": adapter_id}}
    start = time.perf_counter()
    stamps: list[float] = []
    try:
        async with client.stream("POST", "/generate_stream", json=body) as response:
            if response.status_code != 200:
                return StreamResult(0, 0, [], 0, f"HTTP {response.status_code}")
            async for line in response.aiter_lines():
                if line.startswith("data:"):
                    stamps.append(time.perf_counter())
    except httpx.HTTPError as exc:
        return StreamResult(len(stamps), 0, [], 0, repr(exc))
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    return StreamResult(len(stamps), stamps[0] - start if stamps else 0, gaps, time.perf_counter() - start)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def run_scenario(url: str, concurrency: int, max_new_tokens: int, rounds: int,
                       adapters: list[str | None] | None = None, warm: bool = True) -> Scenario:
    """`concurrency` streams at once (x rounds); stream i uses adapters[i % len(adapters)]. With
    `warm`, every adapter first serves one short request (else each first use is a cold load)."""
    adapters = adapters or [None]
    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        if warm:
            await asyncio.gather(*(one_stream(client, PROMPTS[0], 2, a) for a in set(adapters)))
        start = time.perf_counter()
        tasks = [one_stream(client, PROMPTS[i % len(PROMPTS)], max_new_tokens, adapters[i % len(adapters)])
                 for i in range(concurrency * rounds)]
        results = await asyncio.gather(*tasks)
        wall = time.perf_counter() - start
    return summarize(concurrency, results, wall)


def summarize(concurrency: int, results: list[StreamResult], wall: float, skip_gaps: int = 0) -> Scenario:
    """`skip_gaps`: leave each stream's first gaps out of the inter-token latency (start-up prefills)."""
    ok = [r for r in results if r.error is None]
    tokens = sum(r.tokens for r in ok)
    itl = [g for r in ok for g in r.itl_s[skip_gaps:]]
    return Scenario(
        concurrency=concurrency,
        requests=len(results),
        tokens=tokens,
        wall_s=round(wall, 3),
        tokens_per_s=round(tokens / wall, 2),
        ttft_p50_ms=round(1000 * statistics.median([r.ttft_s for r in ok]), 1) if ok else float("nan"),
        ttft_p99_ms=round(1000 * percentile([r.ttft_s for r in ok], 0.99), 1),
        itl_p50_ms=round(1000 * percentile(itl, 0.5), 1),
        itl_p99_ms=round(1000 * percentile(itl, 0.99), 1),
        errors=len(results) - len(ok),
    )


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
