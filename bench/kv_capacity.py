"""How many requests one KV memory budget holds at once: the paged block pool against the dense
slot cache (a slot per sequence, sized for max_total_tokens), in-process, same model and budget.

    .venv/bin/python bench/kv_capacity.py --budget-mb 256 --max-total-tokens 2048 4096

Each run submits `--requests` requests of `--prompt-tokens` prompt tokens and `--new-tokens` new
ones (EOS ignored), steps the engine to the end, and records the most requests decoding together,
the KV bytes in use at that moment (paged: blocks held; what /metrics shows), and tokens/s.
Results go to bench/results/kv_capacity-<time>.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def run(layout: str, budget_mb: int, max_total: int, args: argparse.Namespace, loaded) -> dict:
    from server.config import Limits, Settings
    from server.engine.builder import build_engine
    from server.engine.detokenizer import IncrementalDetokenizer
    from server.engine.request import Request, SamplingParams, StopCriteria

    bytes_per_token = loaded.model.config.kv_bytes_per_token * loaded.dtype.itemsize // 4
    dense_slots = max(1, budget_mb * 2**20 // (max_total * bytes_per_token))  # what the budget buys as slots
    limits = replace(Limits(), max_total_tokens=max_total, max_input_length=min(max_total - 1, 1792),
                     max_batch_prefill_tokens=max(2048, max_total), kv_cache_memory_mb=budget_mb,
                     max_batch_size=dense_slots if layout == "dense" else args.max_batch_size,
                     max_batch_total_tokens=dense_slots * max_total)
    settings = Settings(limits=limits)
    settings = replace(settings, model=replace(settings.model, kv_cache=layout, device="cpu"))
    engine = build_engine(settings, loaded).engine
    # distinct prompts (each starts with its own number), so no two share a cached prefix block
    prompts = [loaded.tokenizer(f"Request {i}. " + "Once upon a time " * args.prompt_tokens)["input_ids"][
        : args.prompt_tokens] for i in range(args.requests)]
    requests = [Request(prompt_ids=prompt, params=SamplingParams(), sink=lambda event: None,
                        stop=StopCriteria(max_new_tokens=args.new_tokens, ignore_eos=True),
                        detokenizer=IncrementalDetokenizer(loaded.tokenizer, prompt, loaded.special_token_ids))
                for prompt in prompts]
    for request in requests:
        engine.scheduler.add(request)
    most, bytes_at_most, started = 0, 0, time.perf_counter()
    while engine.step():
        running = len(engine.scheduler.running)
        if running > most:
            most, bytes_at_most = running, engine.scheduler.kv.used_bytes
    seconds = time.perf_counter() - started
    return {"layout": layout, "max_total_tokens": max_total, "budget_mb": budget_mb, "most_running": most,
            "kv_bytes_in_use_then": bytes_at_most, "tokens_in_use_then": most * (args.prompt_tokens + args.new_tokens),
            "tokens_per_s": sum(r.num_generated for r in requests) / seconds, "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget-mb", type=int, default=256)
    parser.add_argument("--max-total-tokens", type=int, nargs="+", default=[2048, 4096])
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--prompt-tokens", type=int, default=200)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--max-batch-size", type=int, default=64, help="the paged runs' batch-size limit")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    import torch

    from server.config import ModelConfig
    from server.model.loader import load_model

    torch.set_num_threads(args.threads)
    loaded = load_model(ModelConfig(model="default", device="cpu", dtype=args.dtype))
    results = []
    for max_total in args.max_total_tokens:
        pair = {layout: run(layout, args.budget_mb, max_total, args, loaded) for layout in ("dense", "paged")}
        ratio = pair["paged"]["most_running"] / pair["dense"]["most_running"]
        print(f"max_total_tokens {max_total}: dense holds {pair['dense']['most_running']}, paged "
              f"{pair['paged']['most_running']} ({ratio:.1f}x); tokens/s dense {pair['dense']['tokens_per_s']:.0f}, "
              f"paged {pair['paged']['tokens_per_s']:.0f}; paged KV in use then "
              f"{pair['paged']['kv_bytes_in_use_then'] / 2**20:.0f} MB for "
              f"{pair['paged']['tokens_in_use_then']} tokens")
        results.append({**pair, "ratio": ratio})
    out = ROOT / "bench" / "results" / f"kv_capacity-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps({"args": vars(args), "results": results}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
