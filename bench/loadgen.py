"""The HTTP load generator every benchmark shares: streams through the native /generate_stream (one
SSE event per token, so a token whose text is empty or held back still counts), EOS ignored.

No test-suite imports here: bench/gpu_serve.py runs it on the lent GPU machine, which has no pytest.
"""

from __future__ import annotations

import asyncio
import statistics
import subprocess
import time
from dataclasses import dataclass
from typing import Callable, Optional

import httpx

PROMPTS = [
    "What is machine learning?",
    "Write a story about a robot learning to paint.",
    "Explain the difference between a list and a tuple in Python.",
    "Give me three tips for a job interview.",
]
STARTUP_GAPS = 8  # gaps while the streams themselves are still being prefilled are not steady state

Extra = Callable[[int], dict]  # stream index -> more `parameters` for that stream's request


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
                     adapter_id: str | None = None, extra: Optional[dict] = None) -> StreamResult:
    body = {"inputs": prompt, "parameters": {"max_new_tokens": max_new_tokens, "ignore_eos_token": True,
                                             "adapter_id": adapter_id, **(extra or {})}}
    start = time.perf_counter()
    stamps: list[float] = []
    try:
        async with client.stream("POST", "/generate_stream", json=body) as response:
            if response.status_code != 200:
                return StreamResult(0, 0, [], 0, f"HTTP {response.status_code}: {(await response.aread())[:200]!r}")
            async for line in response.aiter_lines():
                if line.startswith("data:") and line[5:].lstrip().startswith('{"error"'):  # failed mid-stream
                    return StreamResult(len(stamps), 0, [], 0, line[5:].strip()[:200])
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
                       adapters: list[str | None] | None = None, warm: bool = True,
                       extra: Optional[Extra] = None) -> Scenario:
    """`concurrency` streams at once (x rounds); stream i uses adapters[i % len(adapters)] and the
    parameters extra(i). With `warm`, every adapter first serves one short request (else each first
    use is a cold load)."""
    adapters = adapters or [None]
    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        if warm:
            await asyncio.gather(*(one_stream(client, PROMPTS[0], 2, a) for a in set(adapters)))
        start = time.perf_counter()
        tasks = [one_stream(client, PROMPTS[i % len(PROMPTS)], max_new_tokens, adapters[i % len(adapters)],
                            extra(i) if extra else None)
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


async def cold_load_itl(url: str, resident: list[str], cold: list[str], streams: int, max_new: int) -> dict:
    """ITL of `streams` running streams: alone; while requests for already-loaded adapters arrive; and
    while the same number of requests for cold adapters arrive (each one a load from disk). Every
    arrival costs a prefill either way, so cold vs warm arrivals isolates what loading costs."""
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        await asyncio.gather(*(one_stream(client, PROMPTS[0], 2, a) for a in resident))

        async def running():
            start = time.perf_counter()
            results = await asyncio.gather(*(one_stream(client, PROMPTS[i % len(PROMPTS)], max_new,
                                                        resident[i % len(resident)]) for i in range(streams)))
            return summarize(streams, list(results), time.perf_counter() - start, skip_gaps=STARTUP_GAPS)

        async def arrivals(names: list[str]):
            await asyncio.sleep(1.0)
            for name in names:  # one request after another while the streams decode
                await one_stream(client, PROMPTS[1], 1, name)

        steady = await running()
        warm, _ = await asyncio.gather(running(), arrivals(resident[: len(cold)]))
        loading, _ = await asyncio.gather(running(), arrivals(cold))
    return {"steady": steady.__dict__, "warm_arrivals": warm.__dict__, "cold_arrivals": loading.__dict__,
            "itl_p99_cold_vs_warm_arrivals": ratio(loading.itl_p99_ms, warm.itl_p99_ms),
            "itl_p99_cold_vs_steady": ratio(loading.itl_p99_ms, steady.itl_p99_ms)}


def ratio(a: float, b: float) -> Optional[float]:
    """a / b, or None where b rounded to 0 (a tiny CPU model's gaps can all be under 0.05 ms)."""
    return round(a / b, 3) if b else None


def wait_ready(url: str, proc: subprocess.Popen, timeout: float) -> None:
    """Until `url` answers 200; fails if the server process exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url}: server exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise TimeoutError(f"{url} not ready after {timeout} s")
