"""Chunked prefill and prefix caching, in-process on the default model (engine loop, no HTTP).

    .venv/bin/python bench/paged_kv.py --chunks 2048 256 64 32     # inter-token latency under a long prompt
    .venv/bin/python bench/paged_kv.py --only prefix                # time to first token with a cached prefix

Chunked prefill: `--streams` greedy streams decode; once they are running, a `--long-prompt`-token
prompt arrives. The streams' inter-token gaps while it is prefilled, against the same streams'
gaps with no long prompt (same run), give the p99 ratio for each chunk budget
(max_batch_prefill_tokens). Prefix caching: a `--system-tokens`
system prompt, asked twice with a different question; the second request's time to first token
against the first's, and a request with another adapter and the same prompt (no hit: its time
stays cold). Results go to
bench/results/paged_kv-<time>.json.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def make_request(loaded, prompt_ids: list[int], new_tokens: int, adapter=None):
    from server.engine.detokenizer import IncrementalDetokenizer
    from server.engine.request import Request, SamplingParams, StopCriteria

    request = Request(prompt_ids=prompt_ids, params=SamplingParams(), sink=lambda event: None, adapter=adapter,
                      stop=StopCriteria(max_new_tokens=new_tokens, ignore_eos=True),
                      detokenizer=IncrementalDetokenizer(loaded.tokenizer, prompt_ids, loaded.special_token_ids))
    return request


def build(loaded, **limits):
    from server.config import AdapterConfig, Limits, Settings
    from server.engine.builder import build_engine

    adapters = AdapterConfig(adapters_dir=str(ROOT / "adapters_cache"))
    settings = Settings(limits=replace(Limits(), **limits), adapters=adapters)
    return build_engine(settings, loaded)


def token_times(engine, requests) -> dict[int, list[float]]:
    """Step the engine to the end, recording when each request gets each token."""
    times: dict[int, list[float]] = {id(r): [] for r in requests}
    counts = {id(r): 0 for r in requests}
    while engine.step():
        now = time.perf_counter()
        for r in requests:
            if r.num_generated > counts[id(r)]:
                counts[id(r)] = r.num_generated
                times[id(r)].append(now)
    return times


def p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]


def chunked(loaded, args) -> list[dict]:
    """Per chunk budget: the streams' step gaps alone, then while the long prompt is prefilled, as
    many of each (so the two p99s are over the same number of gaps), the streams sized to outlast it."""
    prompt = loaded.tokenizer("The history of the printing press " * args.long_prompt)["input_ids"][: args.long_prompt]
    results = []
    for chunk in args.chunks:
        engine = build(loaded, max_batch_prefill_tokens=chunk, max_input_length=max(1792, args.long_prompt + 1),
                       max_total_tokens=max(2048, args.long_prompt + 256)).engine
        frozen = freeze_heap()
        steps = max(30, -(-len(prompt) // chunk) + 2)  # the long prompt's steps, and at least 30
        streams = [make_request(loaded, loaded.tokenizer(f"Story {i}: once upon a time")["input_ids"], 2 * steps + 16)
                   for i in range(args.streams)]
        for r in streams:
            engine.scheduler.add(r)
        while any(r.num_generated < 8 for r in streams):  # all decoding
            engine.step()
        baseline = step_gaps(engine, lambda taken, steps=steps: taken < steps)
        long_request = make_request(loaded, prompt, 4)
        engine.scheduler.add(long_request)
        gaps = step_gaps(engine, lambda taken, request=long_request: request.num_generated == 0)
        assert all(r.num_generated < r.stop.max_new_tokens for r in streams), "the streams ended first"
        ratio = p99(gaps) / p99(baseline)
        results.append({"chunk_tokens": chunk, "baseline_p99_ms": p99(baseline) * 1000,
                        "baseline_p50_ms": p50(baseline) * 1000, "during_p99_ms": p99(gaps) * 1000,
                        "during_p50_ms": p50(gaps) * 1000, "ratio": ratio, "long_prompt_steps": len(gaps),
                        "baseline_steps": len(baseline), "long_prompt_ttft_s": sum(gaps),
                        "startup_heap_frozen": frozen})
        print(f"chunk {chunk:5d}: streams' inter-token p50/p99 "
              f"{p50(baseline) * 1000:4.0f}/{p99(baseline) * 1000:4.0f} "
              f"ms alone, {p50(gaps) * 1000:4.0f}/{p99(gaps) * 1000:4.0f} ms while a {len(prompt)}-token prompt is "
              f"prefilled (p99 {ratio:.2f}x); its prefill took {len(gaps)} steps, {sum(gaps):.1f} s")
        engine.scheduler.running.clear()
        del engine
        unfreeze_heap()
    return results


def step_gaps(engine, go_on) -> list[float]:
    """The time of each engine step while go_on(steps taken so far)."""
    gaps: list[float] = []
    last = time.perf_counter()
    while go_on(len(gaps)):
        engine.step()
        now = time.perf_counter()
        gaps.append(now - last)
        last = now
    return gaps


def freeze_heap() -> int:
    """As the server does after building its engine (server.engine.builder.build_serving_engine):
    the heap out of the garbage collector, so a full collection does not land in a measured step."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


def unfreeze_heap() -> None:
    gc.unfreeze()  # this engine's objects can be collected again
    gc.collect()


def p50(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def prefix(loaded, args) -> dict:
    async_engine = build(loaded)
    engine = async_engine.engine
    system = loaded.tokenizer("You are the assistant of a bakery; you know its menu, hours and allergens. " *
                              (args.system_tokens // 12))["input_ids"][: args.system_tokens]
    questions = [loaded.tokenizer(q)["input_ids"] for q in ("When do you open?", "Is there rye bread?")]
    pirate = async_engine.store.get(async_engine.store.key_for("demo-pirate/1", None)).result()
    ttft = {}
    for name, ids, adapter in (("first", system + questions[0], None), ("second", system + questions[1], None),
                               ("other_adapter", system + questions[1], pirate)):
        request = make_request(loaded, ids, 1, adapter)
        started = time.perf_counter()
        engine.scheduler.add(request)
        while engine.step():
            pass
        ttft[name] = time.perf_counter() - started
    result = {"system_tokens": len(system), **{f"{k}_ttft_s": v for k, v in ttft.items()},
              "speedup": ttft["first"] / ttft["second"]}
    print(f"{len(system)}-token system prompt: TTFT first {ttft['first']:.2f} s, second {ttft['second']:.2f} s "
          f"({result['speedup']:.1f}x), other adapter {ttft['other_adapter']:.2f} s (no hit)")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=("chunked", "prefix"))
    parser.add_argument("--chunks", type=int, nargs="+", default=[2048, 256, 64])
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--long-prompt", type=int, default=1500)
    parser.add_argument("--system-tokens", type=int, default=1000)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    import torch

    from server.config import ModelConfig
    from server.model.loader import load_model

    torch.set_num_threads(args.threads)
    loaded = load_model(ModelConfig(model="default", device="cpu", dtype=args.dtype))
    out = {"args": vars(args)}
    if args.only != "prefix":
        out["chunked"] = chunked(loaded, args)
    if args.only != "chunked":
        out["prefix"] = prefix(loaded, args)
    path = ROOT / "bench" / "results" / f"paged_kv-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(out, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
