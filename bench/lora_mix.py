"""Multi-LoRA throughput and cold-load latency, as ratios against baselines run in the same invocation.

1. 32 concurrent streams over 8 adapters vs the same load on the base model alone;
2. the naive baseline: transformers + peft, one request at a time, set_adapter per request;
3. inter-token latency p99 of running streams while cold adapters load vs steady state.

    .venv/bin/python bench/lora_mix.py [--streams 32] [--adapters 8] [--max-new-tokens 64]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.loadgen import PROMPTS, cold_load_itl, run_scenario  # noqa: E402
from bench.throughput import machine  # noqa: E402
from server.model.default_model import default_model_dir  # noqa: E402
from tests.adapter_factory import AdapterSpec, make_peft_adapter  # noqa: E402
from tests.conftest import ServerProcess  # noqa: E402

ALL_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def make_adapters(root: Path, base: Path, names: list[str], rank: int) -> None:
    for i, name in enumerate(names):
        make_peft_adapter(base, root / name / "1", AdapterSpec(name, rank, 2 * rank, ALL_PROJECTIONS, seed=100 + i))


def naive_peft_baseline(base: Path, adapters_dir: Path, names: list[str], requests: int, max_new: int) -> dict:
    """transformers + peft, one request at a time, set_adapter before each (what we replace)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapters_dir / names[0] / "1",
                                      adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(adapters_dir / name / "1", adapter_name=name)
    model.eval()
    tokens, start = 0, time.perf_counter()
    with torch.no_grad():
        for i in range(requests):
            model.set_adapter(names[i % len(names)])
            ids = tokenizer(PROMPTS[i % len(PROMPTS)], return_tensors="pt")
            out = model.generate(**ids, max_new_tokens=max_new, min_new_tokens=max_new, do_sample=False)
            tokens += out.shape[1] - ids["input_ids"].shape[1]
    wall = time.perf_counter() - start
    return {"requests": requests, "tokens": tokens, "wall_s": round(wall, 2), "tokens_per_s": round(tokens / wall, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=32)
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--naive-requests", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2, help="alternating base/mixed runs; the best of each")
    args = parser.parse_args()

    base = default_model_dir()
    names = [f"bench-{i}" for i in range(args.adapters)]
    cold = [f"cold-{i}" for i in range(4)]
    with tempfile.TemporaryDirectory() as tmp:
        adapters_dir = Path(tmp)
        make_adapters(adapters_dir, base, names + cold, args.rank)
        (ROOT / ".pytest_cache").mkdir(exist_ok=True)
        server = ServerProcess("--max-active-adapters", str(args.adapters + len(cold)),
                               env={"LORASERVE_ADAPTERS_DIR": str(adapters_dir)}, dtype="auto").wait_ready()
        try:
            info = httpx.get(server.url + "/info", timeout=10).json()
            runs = {"base": [], "mixed": []}
            for _ in range(args.repeats):  # alternate, so drift on a shared machine hits both alike
                runs["base"].append(asyncio.run(run_scenario(server.url, args.streams, args.max_new_tokens, 1, [None])))
                runs["mixed"].append(asyncio.run(run_scenario(server.url, args.streams, args.max_new_tokens, 1,
                                                              list(names))))
            base_run, mixed = (max(runs[k], key=lambda s: s.tokens_per_s) for k in ("base", "mixed"))
            cold_report = asyncio.run(cold_load_itl(server.url, names[:4], [f"{c}/1" for c in cold], 8, 96))
        finally:
            server.stop()
        naive = naive_peft_baseline(base, adapters_dir, names, args.naive_requests, args.max_new_tokens)

    report = {
        "benchmark": "lora_mix", "machine": machine(), "server": info, "command": " ".join(sys.argv),
        "adapter_rank": args.rank, "base_only": base_run.__dict__, "mixed_adapters": mixed.__dict__,
        "all_runs": {k: [r.__dict__ for r in v] for k, v in runs.items()},
        "naive_peft": naive, "cold_load": cold_report,
        "ratios": {"mixed_vs_base": round(mixed.tokens_per_s / base_run.tokens_per_s, 3),
                   "mixed_vs_naive_peft": round(mixed.tokens_per_s / naive["tokens_per_s"], 2),
                   "itl_p99_cold_vs_warm_arrivals": cold_report["itl_p99_cold_vs_warm_arrivals"],
                   "itl_p99_cold_vs_steady": cold_report["itl_p99_cold_vs_steady"]},
    }
    out = ROOT / "bench" / "results" / f"lora_mix-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report["ratios"], indent=2))
    print(f"base {base_run.tokens_per_s} tok/s, {args.adapters} adapters {mixed.tokens_per_s} tok/s, "
          f"naive peft {naive['tokens_per_s']} tok/s; ITL p99 steady {cold_report['steady']['itl_p99_ms']} ms, "
          f"warm arrivals {cold_report['warm_arrivals']['itl_p99_ms']} ms, "
          f"cold loads {cold_report['cold_arrivals']['itl_p99_ms']} ms")
    print(f"saved {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
