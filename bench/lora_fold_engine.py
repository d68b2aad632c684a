"""The folded CPU LoRA against the separate kernel, in the engine: two engines in one process (one
with the device tier's pools blocked for linear_cpu.c, what a bf16 CPU serves; one with them plain,
so lora_cpu.c adds each part's delta after the matmul), each decoding `rows` streams of the base
model and then over `adapters` random rank-8 adapters, the four runs alternated for `rounds`
rounds. Reports each run's decode step (ms, median and minimum) and mixed/base per engine.
Results: bench/results/lora_fold_engine-<timestamp>.json.

    .venv/bin/python bench/lora_fold_engine.py [--rounds 6] [--rows 32] [--adapters 8]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.step_time import decode_ms, new_requests, random_adapters  # noqa: E402
from bench.throughput import machine  # noqa: E402
from server.config import Limits, ModelConfig, Settings  # noqa: E402
from server.engine.builder import build_engine  # noqa: E402
from server.model.loader import load_model  # noqa: E402


def engine_side(folded: bool, rows: int, adapters: int) -> tuple:
    loaded = load_model(ModelConfig(model="default", device="cpu", dtype="bfloat16"))
    engine = build_engine(Settings(limits=replace(Limits(), max_batch_size=rows)), loaded).engine
    tier = engine.scheduler.adapters
    if not folded:  # (before the first activation makes the pools: plain B^T, the separate kernel)
        tier._blocked = [False] * len(tier._blocked)
        tier.planner.folds = False
    return loaded, engine, random_adapters(loaded.model, adapters, 8, loaded.dtype)


def run(side: tuple, rows: int, with_adapters: bool) -> float:
    loaded, engine, mix = side
    return decode_ms(engine, new_requests(loaded, mix if with_adapters else [], rows, 48))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--out-dir", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    torch.set_num_threads(1)
    info = machine()
    sides = {"folded": engine_side(True, args.rows, args.adapters),
             "separate": engine_side(False, args.rows, args.adapters)}
    times: dict[str, list[float]] = {}
    for _ in range(args.rounds):
        for name, side in sides.items():
            for kind in ("base", "mixed"):
                times.setdefault(f"{name}-{kind}", []).append(run(side, args.rows, kind == "mixed"))
    summary = {key: {"median_ms": round(statistics.median(v), 2), "min_ms": round(min(v), 2)}
               for key, v in times.items()}
    for name in sides:
        base, mixed = times[f"{name}-base"], times[f"{name}-mixed"]
        summary[f"{name}-mixed/base"] = {"by_medians": round(statistics.median(base) / statistics.median(mixed), 3),
                                         "by_minimums": round(min(base) / min(mixed), 3)}
    print(json.dumps(summary))
    args.out_dir.mkdir(parents=True, exist_ok=True)
    out = args.out_dir / f"lora_fold_engine-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps({"benchmark": "lora_fold_engine", "machine": info, **vars(args), "out_dir": None,
                               "summary": summary, "step_ms": times}, indent=1))
    print(f"saved {out}")


if __name__ == "__main__":
    main()
