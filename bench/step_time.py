"""In-process decode step time (engine loop, no HTTP) at several batch sizes, for before/after records.

    .venv/bin/python bench/step_time.py --dtype bfloat16 --batches 1 8 32
    .venv/bin/python bench/step_time.py --root /tmp/old-checkout ...   # the same, on another commit's code
    .venv/bin/python bench/step_time.py --adapters 8 ...   # rows spread over 8 random rank-8 adapters

The optimisation log in docs/benchmarks.md compares commits by running this for each, alternating,
in one invocation (see `--root`); only ratios between such runs mean anything on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path


def random_adapters(model, count: int, rank: int, dtype) -> list:
    """`count` adapters of rank `rank` on every projection of every layer, in the serving dtype."""
    import torch

    from server.adapters.weights import AdapterKey, AdapterWeights

    adapters = []
    for i in range(count):
        modules = {key: ((torch.randn(rank, t.in_features) * 0.01).to(dtype),
                         (torch.randn(t.out_features, rank) * 0.01).to(dtype))
                   for key, t in model.lora_targets().items()}
        adapters.append(AdapterWeights(AdapterKey("local", f"random-{i}"), rank, modules))
    return adapters


def measure(batches: list[int], dtype: str, new_tokens: int, threads: int, quantize: str,
            kv_cache: str, adapters: int = 0, profile: int = 0) -> dict[int, float]:
    import torch

    from server.config import Limits, ModelConfig, Settings
    from server.engine.builder import build_engine
    from server.model.loader import load_model

    torch.set_num_threads(threads)
    extra = {"quantize": quantize} if quantize != "none" else {}  # older commits have no such options
    extra.update({"kv_cache": kv_cache} if kv_cache != "auto" else {})
    loaded = load_model(ModelConfig(model="default", device="cpu", dtype=dtype, **extra))
    engine = build_engine(Settings(limits=replace(Limits(), max_batch_size=max(batches))), loaded).engine
    mix = random_adapters(loaded.model, adapters, 8, loaded.dtype)
    results = {}
    for batch in batches:
        results[batch] = decode_ms(engine, new_requests(loaded, mix, batch, new_tokens))
        if profile:
            print_profile(engine, new_requests(loaded, mix, batch, new_tokens), batch, profile)
    return results


def decode_ms(engine, requests: list) -> float:
    """The requests prefilled, then their decode steps' mean time (ms) until all are done."""
    for request in requests:
        engine.scheduler.add(request)
    while any(r.num_generated == 0 for r in requests):  # prefills are not what this measures
        engine.step()
    started, steps = time.perf_counter(), 0
    while engine.step():
        steps += 1
    return (time.perf_counter() - started) / steps * 1000


def new_requests(loaded, mix: list, batch: int, new_tokens: int) -> list:
    from server.engine.detokenizer import IncrementalDetokenizer
    from server.engine.request import Request, SamplingParams, StopCriteria

    requests = []
    for i in range(batch):
        prompt = loaded.tokenizer(f"Story number {i}: once upon a time")["input_ids"]
        requests.append(Request(prompt_ids=prompt, params=SamplingParams(), sink=lambda event: None,
                                stop=StopCriteria(max_new_tokens=new_tokens, ignore_eos=True),
                                adapter=mix[i % len(mix)] if mix else None,
                                detokenizer=IncrementalDetokenizer(loaded.tokenizer, prompt,
                                                                   loaded.special_token_ids)))
    return requests


def print_profile(engine, requests: list, batch: int, rows: int) -> None:
    """Run the batch again under torch's profiler and print the `rows` ops costing the most self time."""
    import torch

    for request in requests:
        engine.scheduler.add(request)
    while any(r.num_generated == 0 for r in requests):
        engine.step()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        steps = 0
        while engine.step():
            steps += 1
    print(f"# batch {batch}: {steps} steps profiled; per step = total / {steps}")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path(__file__).resolve().parent.parent,
                        help="checkout whose server/ package to measure")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quantize", default="none", choices=("none", "int8"))
    parser.add_argument("--kv-cache", default="auto", choices=("auto", "paged", "dense"))
    parser.add_argument("--adapters", type=int, default=0, help="spread the rows over this many random adapters")
    parser.add_argument("--profile", type=int, default=0, metavar="ROWS",
                        help="also profile each batch's decode steps and print the ROWS costliest ops")
    args = parser.parse_args()
    sys.path.insert(0, str(args.root))
    ms = measure(args.batches, args.dtype, args.new_tokens, args.threads, args.quantize, args.kv_cache,
                 **({"adapters": args.adapters} if args.adapters else {}),
                 **({"profile": args.profile} if args.profile else {}))
    print(json.dumps({"root": str(args.root), "dtype": args.dtype, "quantize": args.quantize, "threads": args.threads,
                      "kv_cache": args.kv_cache, "adapters": args.adapters,
                      "step_ms": {b: round(v, 2) for b, v in ms.items()}}))


if __name__ == "__main__":
    main()
