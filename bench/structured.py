"""Constrained vs unconstrained decode throughput, and schema compile times.

Same server, same prompts, same number of tokens: N streams with a JSON schema (EOS ignored is not
possible under a grammar, so both sides run a fixed token budget by forcing max_new_tokens and only
counting requests that used it all), alternating with N unconstrained streams. Compile times are
measured in-process on the grammar worker for a set of schemas, cold (first) and cached.

    .venv/bin/python bench/structured.py [--streams 8] [--max-new-tokens 48]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.throughput import machine  # noqa: E402
from tests.conftest import ServerProcess  # noqa: E402

# An array of free-text strings: the grammar stays open for many tokens, like real extraction output.
LONG_SCHEMA = {"type": "object", "required": ["notes"], "properties": {
    "notes": {"type": "array", "items": {"type": "string"}, "minItems": 40}}}
PROMPT = "Write many short notes about the ocean, as JSON."


async def timed_stream(client: httpx.AsyncClient, params: dict) -> tuple[int, float]:
    start, tokens = time.perf_counter(), 0
    async with client.stream("POST", "/generate_stream", json={"inputs": PROMPT, "parameters": params}) as r:
        async for line in r.aiter_lines():
            tokens += line.startswith("data:")
    return tokens, time.perf_counter() - start


async def throughput(url: str, streams: int, params: dict) -> float:
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        await timed_stream(client, {**params, "max_new_tokens": 2})
        start = time.perf_counter()
        results = await asyncio.gather(*(timed_stream(client, params) for _ in range(streams)))
        return sum(t for t, _ in results) / (time.perf_counter() - start)


def compile_times() -> dict:
    from server.config import ModelConfig
    from server.model.loader import load_model
    from server.structured.guide import Constraint, GuideFactory
    from tests.test_structured import SCHEMAS

    loaded = load_model(ModelConfig())
    factory = GuideFactory(loaded.tokenizer, loaded.eos_token_ids)
    start = time.perf_counter()
    factory.guide_for(Constraint.json_schema(None)).result()
    setup = time.perf_counter() - start  # tokenizer conversion, once per process
    cold, cached = {}, {}
    for name, schema in SCHEMAS.items():
        for table in (cold, cached):
            start = time.perf_counter()
            factory.guide_for(Constraint.json_schema(schema)).result()
            table[name] = round(1000 * (time.perf_counter() - start), 2)
    guide = factory.guide_for(Constraint.json_schema(SCHEMAS["rich_character"])).result()
    import torch

    logits = torch.zeros(len(loaded.tokenizer))
    start = time.perf_counter()
    for _ in range(200):
        guide.mask(logits)
    mask_ms = 1000 * (time.perf_counter() - start) / 200
    return {"tokenizer_setup_s": round(setup, 2), "compile_ms_cold": cold, "compile_ms_cached": cached,
            "mask_ms_per_row": round(mask_ms, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    (ROOT / ".pytest_cache").mkdir(exist_ok=True)
    server = ServerProcess(dtype="auto").wait_ready()
    plain = {"max_new_tokens": args.max_new_tokens, "ignore_eos_token": True}
    constrained = {"max_new_tokens": args.max_new_tokens,
                   "response_format": {"type": "json_object", "schema": LONG_SCHEMA}}
    runs: dict[str, list[float]] = {"unconstrained": [], "constrained": []}
    try:
        for _ in range(args.repeats):  # alternate so machine drift hits both alike
            runs["unconstrained"].append(asyncio.run(throughput(server.url, args.streams, plain)))
            runs["constrained"].append(asyncio.run(throughput(server.url, args.streams, constrained)))
    finally:
        server.stop()
    best = {k: max(v) for k, v in runs.items()}
    report = {"benchmark": "structured", "machine": machine(), "command": " ".join(sys.argv),
              "streams": args.streams, "max_new_tokens": args.max_new_tokens,
              "tokens_per_s": {k: [round(x, 2) for x in v] for k, v in runs.items()},
              "ratio_constrained_vs_unconstrained": round(best["constrained"] / best["unconstrained"], 3),
              "median_ratio": round(statistics.median(runs["constrained"]) / statistics.median(runs["unconstrained"]),
                                    3),
              "compile": compile_times()}
    out = ROOT / "bench" / "results" / f"structured-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(report, indent=2))
    print(json.dumps({k: report[k] for k in ("tokens_per_s", "ratio_constrained_vs_unconstrained", "compile")},
                     indent=1))
    print(f"saved {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
