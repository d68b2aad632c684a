"""A decode step's projections with LoRA on a bf16 CPU: the LoRA folded into linear_cpu.c's pass
(`linear_lora`, what the server runs) against the plain projections followed by lora_cpu.c's separate
per-part kernel, and against the projections alone.

The default model's 120 fused projections (30 layers of q/k/v, o, gate/up, down) with random weights
of their real sizes (so the weights stream from memory as in a step), each with its own pool of
packed rank-8 adapters; `rows` rows over `adapters` adapters in slots spread over the pool (or side by
side with --adjacent, as a batch loaded together gets them). One thread; the rounds alternate the
three, and the report gives each one's minimum and median per step (ms).
Results: bench/results/lora_fold-<timestamp>.json.

    .venv/bin/python bench/lora_fold.py [--rows 32] [--adapters 8] [--rounds 20] [--adjacent] [--layers 30]
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.throughput import machine, save_report  # noqa: E402
from server.kernels import native  # noqa: E402

POOL_COLUMNS, RANK = 512, 8
# SmolLM2-135M's fused projections: (parts' output sizes, input size)
SHAPES = [((576, 192, 192), 576), ((576,), 576), ((1536, 1536), 576), ((576,), 1536)]


def projections(layers: int, rows: int, generator: torch.Generator) -> list[dict]:
    out = []
    for _, (sizes, in_) in itertools.product(range(layers), SHAPES):
        kernel = native.linear_kernel()
        a = (torch.randn(POOL_COLUMNS, len(sizes), in_, generator=generator) * 0.01).to(torch.bfloat16)
        b_t = (torch.randn(POOL_COLUMNS, sum(sizes), generator=generator) * 0.01).to(torch.bfloat16)
        out.append({"sizes": sizes, "x": torch.randn(rows, in_, generator=generator).to(torch.bfloat16),
                    "weight": kernel.block(torch.randn(sum(sizes), in_, generator=generator).to(torch.bfloat16), None),
                    "a": a, "b_t": b_t, "pool": native.lora_pool(a, native.block_lora_b(b_t), sizes)})
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--adjacent", action="store_true", help="the adapters in slots 0..n-1, not spread")
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--out-dir", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args(argv)
    kernel, lora = native.linear_kernel(), native.lora_kernel()
    if kernel is None or lora is None:
        sys.exit("linear_cpu.c or lora_cpu.c is not built here (no AVX512-BF16 or no C compiler)")
    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(0)
    info = machine()
    layers = projections(args.layers, args.rows, generator)
    slots = (list(range(args.adapters)) if args.adjacent
             else torch.randperm(POOL_COLUMNS // RANK, generator=generator)[: args.adapters].tolist())
    lo = [RANK * slots[t % args.adapters] for t in range(args.rows)]
    as_int32 = lambda v: torch.tensor(v, dtype=torch.int32)  # noqa: E731
    step = lora.step(as_int32(lo), as_int32([RANK] * args.rows), as_int32(sorted(range(args.rows), key=lo.__getitem__)))

    def base() -> None:
        for p in layers:
            kernel(p["x"], p["weight"])

    def folded() -> None:
        for p in layers:
            kernel.with_lora(p["x"], p["weight"], p["pool"], step)

    def separate() -> None:
        for p in layers:
            y, start = kernel(p["x"], p["weight"]), 0
            for part, size in enumerate(p["sizes"]):
                step(y[:, start : start + size], p["x"], p["a"][:, part], p["b_t"][:, start : start + size])
                start += size

    times: dict[str, list[float]] = {"base": [], "folded": [], "separate": []}
    for _ in range(args.rounds):
        for name, run in (("base", base), ("folded", folded), ("separate", separate)):
            started = time.perf_counter()
            run()
            times[name].append((time.perf_counter() - started) * 1000)
    summary = {name: {"min_ms": round(min(v), 2), "median_ms": round(statistics.median(v), 2)}
               for name, v in times.items()}
    for name in ("folded", "separate"):
        summary[name]["lora_ms_over_base_min"] = round(min(times[name]) - min(times["base"]), 2)
    report = {"benchmark": "lora_fold", "machine": info, "rows": args.rows, "adapters": args.adapters,
              "adjacent": args.adjacent, "layers": args.layers, "rounds": args.rounds, "summary": summary}
    print(json.dumps(summary))
    save_report(report, args.out_dir)
    return report


if __name__ == "__main__":
    main()
