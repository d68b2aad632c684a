"""Many adapters at once, one server with default settings, ratios from one invocation (issue #13).

32 concurrent streams (EOS ignored) over: 8 warm adapters (the baseline); 24 cold adapters (each
first use a load from disk: the churn run); 64 adapters, 64 requests, cold and then warm; and the
8 adapters again with the same 64 requests, the throughput baseline for the 64. Reports time to
first token p99 (24 cold vs 8) and throughput (64 warm vs 8). Results: bench/results/adapter_churn-*.json.

    .venv/bin/python bench/adapter_churn.py [--streams 32] [--max-new-tokens 64] [--repeats 2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.loadgen import run_scenario  # noqa: E402
from bench.lora_mix import make_adapters  # noqa: E402
from bench.throughput import machine, wait_for_quiet  # noqa: E402
from server.model.default_model import default_model_dir  # noqa: E402
from tests.adapter_factory import variant_copy  # noqa: E402
from tests.conftest import ServerProcess  # noqa: E402


def make_many(root: Path, names: list[str], rank: int) -> None:
    """One rank-`rank` all-projection adapter made with peft, the rest its copies with fresh B."""
    make_adapters(root, default_model_dir(), names[:1], rank)
    for i, name in enumerate(names[1:], start=1):
        variant_copy(root / names[0] / "1", root / name / "1", seed=1000 + i)


def scenarios(url: str, args: argparse.Namespace) -> dict:
    eight = [f"a8-{i}/1" for i in range(8)]
    cold = [f"c24-{i}/1" for i in range(24)]
    many = [f"m64-{i}/1" for i in range(64)]
    s, n = args.streams, args.max_new_tokens
    out = {"8_warm": run_scenario(url, s, n, 1, eight),
           "24_cold": run_scenario(url, s, n, 1, cold, warm=False),
           "64_cold_x2": run_scenario(url, s, n, 2, many, warm=False)}
    for r in range(args.repeats):  # alternate, so drift on a shared machine hits both alike
        out[f"8_warm_x2_run{r}"] = run_scenario(url, s, n, 2, eight)
        out[f"64_warm_x2_run{r}"] = run_scenario(url, s, n, 2, many)
    return {k: asdict(asyncio.run(v)) for k, v in out.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_many(root, [f"a8-{i}" for i in range(8)] + [f"c24-{i}" for i in range(24)]
                  + [f"m64-{i}" for i in range(64)], args.rank)
        (ROOT / ".pytest_cache").mkdir(exist_ok=True)
        load_before = wait_for_quiet()
        server = ServerProcess(env={"LORASERVE_ADAPTERS_DIR": str(root)}, dtype="auto").wait_ready()
        try:
            info = httpx.get(server.url + "/info", timeout=10).json()
            results = scenarios(server.url, args)
            adapters = httpx.get(server.url + "/adapters", timeout=10).json()
        finally:
            server.stop()
    best = {k: max((v for name, v in results.items() if name.startswith(k)), key=lambda v: v["tokens_per_s"])
            for k in ("8_warm_x2", "64_warm_x2")}
    ratios = {"ttft_p99_24_cold_vs_8": round(results["24_cold"]["ttft_p99_ms"] / results["8_warm"]["ttft_p99_ms"], 2),
              "tokens_per_s_64_warm_vs_8": round(best["64_warm_x2"]["tokens_per_s"]
                                                  / best["8_warm_x2"]["tokens_per_s"], 3),
              "tokens_per_s_64_cold_vs_8": round(results["64_cold_x2"]["tokens_per_s"]
                                                  / best["8_warm_x2"]["tokens_per_s"], 3)}
    report = {"benchmark": "adapter_churn", "machine": {**machine(), "loadavg_1m_at_start": load_before,
                                                        "loadavg_1m_at_end": round(os.getloadavg()[0], 2)},
              "server": info, "command": " ".join(sys.argv), "adapter_rank": args.rank, "scenarios": results,
              "device_adapter_memory_mb": adapters.get("device_adapter_memory_mb"), "ratios": ratios}
    out = ROOT / "bench" / "results" / f"adapter_churn-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(report, indent=2))
    for name, r in results.items():
        print(f"{name:>18} {r['tokens_per_s']:>8} tok/s  ttft p50 {r['ttft_p50_ms']:>8} p99 {r['ttft_p99_ms']:>8} ms"
              f"  itl p50 {r['itl_p50_ms']:>6} p99 {r['itl_p99_ms']:>7} ms  errors {r['errors']}")
    print(json.dumps(ratios, indent=2))
    print(f"saved {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
