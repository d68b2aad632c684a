"""The CPU matmul kernels for the default model's projections, timed on this machine: every layer's
projections and the LM head once, at several row counts, as plain F.linear and as oneDNN-prepacked
weights (what server/model/layers.py:prepack_cpu_weights chose from this), in bf16 and fp32.

    .venv/bin/python bench/linear_kernels.py [--threads 1]

Prints milliseconds per full pass of the model's matmuls; saves bench/results/linear_kernels-<stamp>.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.throughput import machine  # noqa: E402

LAYERS = 30  # SmolLM2-135M: fused q/k/v, o, fused gate/up, down per layer, then the tied LM head
SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)] * LAYERS + [(49152, 576)]
ROWS = (1, 2, 8, 32, 64, 256)


def best_ms(fn, weights: list, inputs: list, repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        for w, x in zip(weights, inputs):
            fn(x, w)
        best = min(best, time.perf_counter() - started)
    return round(best * 1e3, 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    packed_linear = lambda x, w: torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")  # noqa: E731
    results = {}
    for dtype in (torch.bfloat16, torch.float32):
        plain = [(torch.randn(o, i) * 0.02).to(dtype) for o, i in SHAPES]
        packed = [torch.ops.mkldnn._reorder_linear_weight(w, None) for w in plain]
        for name, fn, weights in (("plain", F.linear, plain), ("prepacked", packed_linear, packed)):
            row = {}
            for rows in ROWS:
                inputs = [torch.randn(rows, i).to(dtype) for _, i in SHAPES]
                row[rows] = best_ms(fn, weights, inputs)
            results[f"{str(dtype).removeprefix('torch.')} {name}"] = row
            print(f"{str(dtype):15s} {name:10s}", " ".join(f"{rows}:{ms:7.2f}" for rows, ms in row.items()), flush=True)
    report = {"benchmark": "linear_kernels", "machine": machine(), "threads": args.threads,
              "command": " ".join(sys.argv), "unit": "ms per pass over every projection and the LM head",
              "rows": list(ROWS), "results": results}
    out = ROOT / "bench" / "results" / f"linear_kernels-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(report, indent=2))
    print(f"saved {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
