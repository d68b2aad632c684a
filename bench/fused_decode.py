"""Decode steps with every layer in one C call (kernels/decoder_cpu.c) against the Python loop over
the layers, in one engine in one process (bf16 CPU, the default model): each row count's steps of
the base model, and at the largest count also over random rank-8 adapters, the two paths alternated
for `rounds` rounds. Reports each run's decode step (ms, median and minimum) and loop / one call.
Results: bench/results/fused_decode-<timestamp>.json.

    .venv/bin/python bench/fused_decode.py [--rounds 4] [--rows 1 8 32] [--adapters 8] [--threads 1]
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
from dataclasses import replace
from pathlib import Path
from typing import Optional

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.step_time import decode_ms, new_requests, random_adapters  # noqa: E402
from bench.throughput import machine, save_report  # noqa: E402
from server.config import Limits, ModelConfig, Settings  # noqa: E402
from server.engine.builder import build_engine  # noqa: E402
from server.model.loader import load_model  # noqa: E402


def main(argv: Optional[list[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--adapters", type=int, default=8, help="0: no mixed run")
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out-dir", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    info = machine()
    loaded = load_model(ModelConfig(model="default", device="cpu", dtype="bfloat16"))
    fused = loaded.model.fused_decode
    if fused is None:
        raise SystemExit("no decoder_cpu.c here (no AVX512-BF16, or no C compiler)")
    engine = build_engine(Settings(limits=replace(Limits(), max_batch_size=max(args.rows))), loaded).engine
    mix = random_adapters(loaded.model, args.adapters, 8, loaded.dtype) if args.adapters else []
    gc.collect()
    gc.freeze()  # (as the server does: a full collection walking the start-up heap is not a step's cost)
    runs = [(f"base-{rows}", rows, []) for rows in args.rows]
    if mix:
        runs.append((f"mixed-{max(args.rows)}x{len(mix)}", max(args.rows), mix))
    times: dict[str, list[float]] = {}
    for _ in range(args.rounds):
        for name, rows, adapters in runs:
            for path in ("one-call", "loop"):
                loaded.model.fused_decode = fused if path == "one-call" else None
                times.setdefault(f"{name} {path}", []).append(
                    decode_ms(engine, new_requests(loaded, adapters, rows, args.new_tokens)))
    loaded.model.fused_decode = fused
    summary = {}
    for name, _, _ in runs:
        one, loop = times[f"{name} one-call"], times[f"{name} loop"]
        median_one, median_loop = statistics.median(one), statistics.median(loop)
        summary[name] = {"one_call_ms": {"median": round(median_one, 2), "min": round(min(one), 2)},
                         "loop_ms": {"median": round(median_loop, 2), "min": round(min(loop), 2)},
                         "loop_over_one_call": {"by_medians": round(median_loop / median_one, 3),
                                                "by_minimums": round(min(loop) / min(one), 3)}}
    print(json.dumps(summary))
    report = {"benchmark": "fused_decode", "machine": info, "command": " ".join(sys.argv),
              **{k: v for k, v in vars(args).items() if k != "out_dir"}, "summary": summary, "step_ms": times}
    save_report(report, args.out_dir)
    return report


if __name__ == "__main__":
    main()
