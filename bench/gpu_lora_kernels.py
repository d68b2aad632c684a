"""The CUDA LoRA kernels alone (server/kernels/lora_triton.py) at an 8B model's four fused projections:
microseconds per decoder layer for each launch setting (the shrink's program target, the expand's
block of output columns), captured in a CUDA graph as a decode step replays them (timed eagerly,
Triton's host-side launches would be measured instead).

  python bench/gpu_lora_kernels.py                     # on the GPU machine: rows 1, 8, 32, 64, 16 adapters
  python bench/gpu_lora_kernels.py --device cpu --rows 2 --layers 1 --repeats 1   # interpreted (CI)

Rows take adapters round-robin; the tile slots are the step's tiles rounded up to a power of two
(at least 4), as the decode graphs launch them. Writes bench/results/gpu_lora_kernels-<time>.json.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from server.kernels import lora_triton  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
PROJECTIONS = {  # Llama-3-8B: name -> (in features, output parts)
    "qkv": (4096, (4096, 1024, 1024)),
    "o": (4096, (4096,)),
    "gate_up": (4096, (14336, 14336)),
    "down": (14336, (4096,)),
}
TINY = {"qkv": (64, (64, 32, 32)), "o": (64, (64,)), "gate_up": (64, (96, 96)), "down": (96, (64,))}


def tiles_for(rows: int, adapters: int, rank: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    lo = [(i % adapters) * rank for i in range(rows)]
    order, tiles = lora_triton.plan_tiles(lo, [rank] * rows, max_tiles=rows)
    used = sum(1 for w in tiles[3] if w > 0)
    slots = min(rows, max(4, 1 << (used - 1).bit_length()))
    columns = torch.tensor([order, *tiles], dtype=torch.int32, device=device)
    return columns[0], columns[1:, :slots]


def layer_time(shapes: dict, rows: int, adapters: int, rank: int, layers: int, repeats: int,
               device: torch.device, dtype: torch.dtype) -> float:
    """Seconds per decoder layer of the four projections' LoRA (one zeroed sums buffer a layer)."""
    g = torch.Generator(device="cpu").manual_seed(0)
    calls = []
    for in_features, sizes in shapes.values():
        cols, parts = adapters * rank, len(sizes)
        a = (torch.randn(cols, parts, in_features, generator=g) * 0.01).to(device, dtype)
        b_t = (torch.randn(cols, sum(sizes), generator=g) * 0.01).to(device, dtype)
        x = torch.randn(rows, in_features, generator=g).to(device, dtype)
        y = torch.zeros(rows, sum(sizes), device=device, dtype=dtype)
        calls.append((y, x, a, b_t, sizes))
    order, tiles = tiles_for(rows, adapters, rank, device)
    rank_tile = lora_triton.rank_block(rank)
    sums = torch.zeros(len(calls), rows, lora_triton.MAX_PARTS, rank_tile, device=device, dtype=torch.float32)

    def layer() -> None:
        sums.zero_()
        for i, (y, x, a, b_t, sizes) in enumerate(calls):
            lora_triton.add_lora(y, x, a, b_t, sizes, order, tiles, rank_tile, sums[i, :, : len(sizes)])

    layer()  # compiles
    if device.type != "cuda":
        started = time.perf_counter()
        for _ in range(layers * repeats):
            layer()
        return (time.perf_counter() - started) / (layers * repeats)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(layers):
            layer()
    graph.replay()
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(repeats):
        graph.replay()
    torch.cuda.synchronize()
    return (time.perf_counter() - started) / (layers * repeats)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rows", default="1,8,32,64")
    parser.add_argument("--adapters", type=int, default=16)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--targets", default="256,512,1024,2048", help="shrink programs to aim for")
    parser.add_argument("--expand-blocks", default="64,128,256", help="output columns per expand program")
    parser.add_argument("--layers", type=int, default=32, help="layers per captured graph")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # (the interpreter runs fp32)
    shapes = PROJECTIONS if device.type == "cuda" else TINY
    defaults = (lora_triton.TARGET_PROGRAMS, lora_triton.EXPAND_BLOCK)
    results = []
    for rows in (int(r) for r in args.rows.split(",")):
        for target, block in itertools.product((int(t) for t in args.targets.split(",")),
                                               (int(b) for b in args.expand_blocks.split(","))):
            lora_triton.TARGET_PROGRAMS, lora_triton.EXPAND_BLOCK = target, block
            seconds = layer_time(shapes, rows, min(args.adapters, rows), args.rank, args.layers, args.repeats,
                                 device, dtype)
            results.append({"rows": rows, "target_programs": target, "expand_block": block,
                            "us_per_layer": seconds * 1e6})
            mark = " (the default)" if (target, block) == defaults else ""
            print(f"rows {rows:3d} target {target:5d} expand block {block:4d}: {seconds * 1e6:8.1f} us a layer{mark}",
                  flush=True)
    lora_triton.TARGET_PROGRAMS, lora_triton.EXPAND_BLOCK = defaults
    report = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu (interpreted)",
              "adapters": args.adapters, "rank": args.rank, "defaults": defaults, "results": results}
    out = args.out or RESULTS / f"gpu_lora_kernels-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")
    return report


if __name__ == "__main__":
    main()
