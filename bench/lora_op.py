"""Candidate multi-LoRA ops at the default model's projection shapes, timed on this machine.

Decode batches of 32 rows over 1, 8, 24 and 32 distinct rank-8 adapters picked among 64 resident
in the packed buffers (spread over them, as allocation and eviction leave them; and 8 or 32 side
by side, as the device tier packs a batch's adapters), a prefill-shaped batch (8 sequences of 32
tokens) and a mixed one (24 decode rows, two 64-token chunks). Each method of
server/adapters/lora.py (forced, and as the planner picks it) add the same delta; the report gives
microseconds per decoder layer (the 7 projections) beside the layer's base matmuls.
Results: bench/results/lora_op-<timestamp>.json.

    .venv/bin/python bench/lora_op.py [--repeats 7] [--threads 0]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.throughput import machine, wait_for_quiet  # noqa: E402
from server.adapters.lora import LoraPlanner, OneAdapter, lora_delta  # noqa: E402

RANK = 8
RESIDENT = 64
# SmolLM2-135M: (in, out) of q, k, v, o, gate, up, down; the base runs them fused (qkv, gate_up)
SHAPES = [(576, 576), (576, 192), (576, 192), (576, 576), (576, 1536), (576, 1536), (1536, 576)]
BASE_SHAPES = [(576, 960), (576, 576), (576, 3072), (1536, 576)]

Op = Callable[[torch.Tensor], torch.Tensor]


def case(tokens_per_seq: list[int], adapters: list[int]) -> dict:
    """Sequence i feeds tokens_per_seq[i] tokens with the adapter in slot adapters[i]."""
    ranges = tuple((s * RANK, (s + 1) * RANK) for s in adapters)
    return {"ranges": ranges, "query_lens": tuple(tokens_per_seq), "tokens": sum(tokens_per_seq),
            "distinct": len(set(adapters))}


def spread(n: int, count: int, seed: int) -> list[int]:
    """`count` sequences over `n` adapters picked among the RESIDENT slots (spread over the buffer)."""
    chosen = torch.randperm(RESIDENT, generator=torch.Generator().manual_seed(seed))[:n].tolist()
    return [chosen[i % n] for i in range(count)]


def cases() -> dict[str, dict]:
    out = {f"decode-32x{d}": case([1] * 32, spread(d, 32, d)) for d in (1, 8, 24, 32)}
    out["decode-32x8-contiguous"] = case([1] * 32, [i % 8 for i in range(32)])  # the first 8 loaded
    out["decode-32x32-contiguous"] = case([1] * 32, list(range(32)))  # as the device tier packs a batch's adapters
    out["prefill-8x32tok-8"] = case([32] * 8, spread(8, 8, 99))
    out["prefill-1x256tok-1"] = case([256], spread(1, 1, 5))
    out["decode-1x1"] = case([1], spread(1, 1, 3))
    out["mixed-24dec+2x64tok-24"] = case([1] * 24 + [64, 64], spread(24, 24, 7) + spread(2, 2, 8))
    return out


def candidates(c: dict, a: torch.Tensor, b_t: torch.Tensor) -> dict[str, Op]:
    planner = LoraPlanner.for_device(torch.device("cpu"), torch.get_default_dtype())
    ranges, lens = c["ranges"], c["query_lens"]
    plans = {"auto": planner.plan(ranges, lens), "masked_window": planner._window(ranges, lens),

             "sorted_runs": planner._runs(ranges, lens), "sorted_groups": planner._groups(ranges, lens),
             "gathered_rows": planner._gathered(ranges, lens)}
    if c["distinct"] == 1 and all(r is not None for r in ranges):
        plans["one_adapter"] = OneAdapter(ranges, lens, *ranges[0])  # two plain matmuls
    if planner.kernel is not None:
        plans["token_columns"] = planner._token_columns(ranges, lens)
    ops: dict[str, Op] = {name: (lambda x, p=p: lora_delta(x, a, b_t, p)) for name, p in plans.items()}
    ops["auto"].method = type(plans["auto"]).__name__
    return ops


def time_layer(fns: list[Callable[[], torch.Tensor]], repeats: int, inner: int) -> float:
    """Median over repeats of the mean time (µs) of running every fn once."""
    for fn in fns:
        fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(inner):
            for fn in fns:
                fn()
        samples.append((time.perf_counter() - start) / inner * 1e6)
    return round(statistics.median(samples), 1)


def check(ops: dict[str, Op], x: torch.Tensor) -> None:
    want = ops["masked_window"](x)
    for name, op in ops.items():
        torch.testing.assert_close(op(x).float(), want.float(), atol=5e-2, rtol=5e-2, msg=name)


def run(repeats: int) -> dict:
    torch.manual_seed(0)
    buffers = [(torch.randn(RESIDENT * RANK, i) * 0.05, torch.randn(RESIDENT * RANK, o) * 0.05) for i, o in SHAPES]
    base = [torch.randn(o, i) * 0.05 for i, o in BASE_SHAPES]
    report: dict = {}
    for name, c in cases().items():
        xs = [torch.randn(c["tokens"], i) for i, _ in SHAPES]
        per_shape = [candidates(c, a, b_t) for a, b_t in buffers]
        for ops, x in zip(per_shape, xs):
            check(ops, x)
        inner = 20 if c["tokens"] <= 64 else 5
        row = {"tokens": c["tokens"], "distinct": c["distinct"], "auto_picks": per_shape[0]["auto"].method}
        x_base = {i: torch.randn(c["tokens"], i) for i, _ in BASE_SHAPES}
        row["base_layer_us"] = time_layer([lambda w=w, x=x_base[i]: torch.nn.functional.linear(x, w)
                                           for w, (i, _) in zip(base, BASE_SHAPES)], repeats, inner)
        for op_name in per_shape[0]:
            row[f"{op_name}_us"] = time_layer([lambda op=ops[op_name], x=x: op(x) for ops, x in zip(per_shape, xs)],
                                              repeats, inner)
        report[name] = row
        print(name, json.dumps(row), flush=True)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                        help="the server's dtype (auto picks bfloat16 on a CPU with AVX512-BF16)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_default_dtype(getattr(torch, args.dtype))
    wait_for_quiet()
    info = machine()
    cases = run(args.repeats)
    info["loadavg_1m_at_end"] = round(__import__("os").getloadavg()[0], 2)
    report = {"benchmark": "lora_op", "machine": info, "threads": torch.get_num_threads(), "rank": RANK,
              "dtype": args.dtype,
              "resident_adapters": RESIDENT, "command": " ".join(sys.argv),
              "unit": "microseconds per decoder layer (7 projections)", "cases": cases}
    out = ROOT / "bench" / "results" / f"lora_op-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(report, indent=2))
    print(f"saved {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
