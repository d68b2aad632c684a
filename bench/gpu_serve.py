"""The real server on a GPU node, end to end (issue #14): an 8B-shaped checkpoint of random bf16
weights, random rank-16 adapters on all seven projections, `python -m server serve`, and the HTTP load
generator (bench/loadgen.py, EOS ignored) at each concurrency: the base model, 16 adapters spread
evenly and Zipf-skewed, cold adapters loading under load, and a half JSON-constrained mix.

    bench/gpu/prepare.sh                      # here: the wheelhouse (.whl) and the tokenizer (.tok)
    bench/gpu/run.sh llama3.1-8b              # there: run(command=..., carry=[".whl", ".tok"])
    .venv/bin/python bench/gpu_serve.py --shape tiny-serve --device cpu --concurrency 1 2   # CPU-sized (CI)

The checkpoint uses the default model's tokenizer: the 8B shapes' vocabularies are larger, so the
random model also emits ids the tokenizer has no text for (as real checkpoints' padded vocabularies
do); each still counts as a token. A time budget (--budget-s) skips what no longer fits, and the
report is written after every scenario. Result: --out (default bench/results/gpu_serve-<shape>-<stamp>.json).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Optional

import httpx
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.load_memory import SHAPES as LOAD_SHAPES  # noqa: E402
from bench.loadgen import cold_load_itl, run_scenario, wait_ready  # noqa: E402

SHAPES = {**LOAD_SHAPES, "tiny-serve": {**LOAD_SHAPES["tiny"], "vocab_size": 50000}}  # ids past the tokenizer's
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
NOTES_SCHEMA = {"type": "object", "required": ["title", "notes"],
                "properties": {"title": {"type": "string"}, "notes": {"type": "array", "items": {"type": "string"}}}}
JSON_FORMAT = {"type": "json_object", "schema": NOTES_SCHEMA}


def write_checkpoint(shape: str, out: Path, tokenizer_dir: Path, device: str) -> Path:
    """Random bf16 weights (transformers' own initialisation, drawn on `device`: seconds on a GPU
    for 8B parameters) in shards, with the given tokenizer."""
    if (out / "config.json").is_file():
        return out
    from transformers import CONFIG_MAPPING, AutoModelForCausalLM

    torch.manual_seed(0)
    config = CONFIG_MAPPING[SHAPES[shape]["model_type"]](**SHAPES[shape])
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(out, max_shard_size="5GB")
    del model
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir / name, out / name)
    return out


def projection_shapes(config: dict) -> dict[str, tuple[int, int]]:
    """(out, in) of each projection from a config.json."""
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    head_dim = config.get("head_dim") or hidden // config["num_attention_heads"]
    q, kv = config["num_attention_heads"] * head_dim, config["num_key_value_heads"] * head_dim
    return {"q_proj": (q, hidden), "k_proj": (kv, hidden), "v_proj": (kv, hidden), "o_proj": (hidden, q),
            "gate_proj": (inter, hidden), "up_proj": (inter, hidden), "down_proj": (hidden, inter)}


def write_adapters(model_dir: Path, root: Path, names: list[str], rank: int) -> None:
    """peft-format LoRA adapters (bf16 safetensors) with random A and B on every projection of every layer."""
    from safetensors.torch import save_file

    config = json.loads((model_dir / "config.json").read_text())
    shapes = projection_shapes(config)
    for i, name in enumerate(names):
        out = root / name / "1"
        if (out / "adapter_model.safetensors").is_file():
            continue
        out.mkdir(parents=True, exist_ok=True)
        g = torch.Generator().manual_seed(1000 + i)
        tensors = {}
        for layer in range(config["num_hidden_layers"]):
            for proj, (n_out, n_in) in shapes.items():
                block = "self_attn" if proj in PROJECTIONS[:4] else "mlp"
                key = f"base_model.model.model.layers.{layer}.{block}.{proj}"
                tensors[f"{key}.lora_A.weight"] = (torch.randn(rank, n_in, generator=g) / n_in**0.5).to(torch.bfloat16)
                tensors[f"{key}.lora_B.weight"] = (torch.randn(n_out, rank, generator=g) * 0.01).to(torch.bfloat16)
        save_file(tensors, str(out / "adapter_model.safetensors"))
        (out / "adapter_config.json").write_text(json.dumps({
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": 2 * rank,
            "target_modules": list(PROJECTIONS), "base_model_name_or_path": str(model_dir)}))


class Server:
    """`python -m server serve` on a free loopback port, its log under the results folder."""

    def __init__(self, model_dir: Path, adapters_dir: Path, device: str, log: Path, extra: list[str]) -> None:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        cmd = [sys.executable, "-m", "server", "serve", "--host", "127.0.0.1", "--port", str(port),
               "--model", str(model_dir), "--device", device, "--dtype", "auto", *extra]
        self.log = log.open("w")
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT,
                                     env={**os.environ, "LORASERVE_ADAPTERS_DIR": str(adapters_dir)})

    def wait_ready(self, timeout: float) -> dict:
        """The server's /info once /health answers 200."""
        wait_ready(self.url + "/health", self.proc, timeout)
        return httpx.get(self.url + "/info", timeout=10).json()

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


STEP_SERIES = {"step": "loraserve_step_seconds", "device": "loraserve_step_device_seconds"}


def step_totals(url: str) -> dict[str, float]:
    """Sums and counts of the decode steps' wall time and their forward passes' GPU time, from /metrics."""
    totals = {}
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        for name, series in STEP_SERIES.items():
            for part in ("sum", "count"):
                if line.startswith(f'{series}_{part}{{kind="decode"}}'):
                    totals[f"{name}_{part}"] = float(line.split()[-1])
    return totals


def step_split(before: dict[str, float], after: dict[str, float]) -> dict[str, Optional[float]]:
    """A scenario's mean decode step: its wall time, the GPU time of its forward pass, and the host's
    share (the rest: batch building, sampling, detokenising, streaming)."""
    def mean(name: str) -> Optional[float]:
        count = after.get(f"{name}_count", 0) - before.get(f"{name}_count", 0)
        return 1000 * (after[f"{name}_sum"] - before.get(f"{name}_sum", 0)) / count if count else None

    step, device = mean("step"), mean("device")
    host = step - device if step is not None and device is not None else None
    return {"decode_steps": after.get("step_count", 0) - before.get("step_count", 0),
            "step_ms": _round(step), "device_ms": _round(device), "host_ms": _round(host)}


def _round(value: Optional[float]) -> Optional[float]:
    return None if value is None else round(value, 2)


def zipf(names: list[str], count: int, s: float = 1.1, seed: int = 0) -> list[str]:
    """`count` draws over `names`, the k-th most popular with weight 1 / k^s."""
    return random.Random(seed).choices(names, weights=[1 / (k + 1) ** s for k in range(len(names))], k=count)


def plan(args: argparse.Namespace, warm: list[str], cold: list[str]) -> list[tuple[str, Callable]]:
    """(name, coroutine factory taking the URL) of every scenario, in the order they run."""
    n = args.max_new_tokens
    out: list[tuple[str, Callable]] = []
    for c in args.concurrency:
        out.append((f"base-{c}", lambda url, c=c: run_scenario(url, c, n, 1, [None])))
        out.append((f"mixed{len(warm)}-{c}", lambda url, c=c: run_scenario(url, c, n, 1, warm)))
        if c >= 8:
            out.append((f"zipf{len(warm)}-{c}", lambda url, c=c: run_scenario(url, c, n, 1, zipf(warm, c))))
    j = args.json_streams
    out.append((f"plain-{j}", lambda url: run_scenario(url, j, n, 1, warm)))
    out.append((f"json-half-{j}", lambda url: run_scenario(
        url, j, n, 1, warm, extra=lambda i: {"response_format": JSON_FORMAT} if i % 2 == 0 else {})))
    out.append(("cold-churn", lambda url: cold_load_itl(url, warm, cold, args.churn_streams, n)))
    return out


def ratios(scenarios: dict, args: argparse.Namespace, adapters: int) -> dict:
    def tps(key: str) -> Optional[float]:
        return scenarios[key]["tokens_per_s"] if key in scenarios else None

    top = max(args.concurrency)
    out = {f"mixed{adapters}_vs_base_at_{top}": _ratio(tps(f"mixed{adapters}-{top}"), tps(f"base-{top}")),
           f"json_half_vs_plain_at_{args.json_streams}": _ratio(tps(f"json-half-{args.json_streams}"),
                                                                tps(f"plain-{args.json_streams}"))}
    if "cold-churn" in scenarios:
        out["cold_loads_itl_p99_vs_warm_arrivals"] = scenarios["cold-churn"]["itl_p99_cold_vs_warm_arrivals"]
    return out


def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return round(a / b, 3) if a and b else None


def main(argv: Optional[list[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="llama3.1-8b", choices=sorted(SHAPES))
    parser.add_argument("--dir", type=Path, help="checkpoint folder (written if empty); default /tmp/ckpt-<shape>")
    parser.add_argument("--tokenizer", type=Path, help="folder with tokenizer.json (default: the default model's)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 64, 128])
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--adapters", type=int, default=16, help="warm adapters in the mixed scenarios")
    parser.add_argument("--cold", type=int, default=8, help="adapters first used during the churn scenario")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--json-streams", type=int, default=32)
    parser.add_argument("--churn-streams", type=int, default=32)
    parser.add_argument("--budget-s", type=float, default=540, help="skip the scenarios that would start after this")
    parser.add_argument("--server-arg", action="append", default=[], help="passed to `server serve` (repeatable)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    started = time.monotonic()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = args.out or ROOT / "bench" / "results" / f"gpu_serve-{args.shape}-{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.tokenizer is None:
        from server.model.default_model import default_model_dir
        args.tokenizer = default_model_dir()
    model_dir = write_checkpoint(args.shape, args.dir or Path(f"/tmp/ckpt-{args.shape}"), args.tokenizer, args.device)
    if args.device == "cuda":
        torch.cuda.empty_cache()  # the server process needs the memory the writer drew the weights in
    warm, cold = [f"w{i}" for i in range(args.adapters)], [f"c{i}" for i in range(args.cold)]
    adapters_dir = model_dir.parent / f"{model_dir.name}-adapters-r{args.rank}"
    write_adapters(model_dir, adapters_dir, warm + cold, args.rank)
    prepared_s = time.monotonic() - started
    server = Server(model_dir, adapters_dir, args.device, out.with_suffix(".log"), args.server_arg)
    report: dict = {"benchmark": "gpu_serve", "shape": args.shape, "command": " ".join(sys.argv),
                    "device": torch.cuda.get_device_name() if args.device == "cuda" else args.device,
                    "torch": torch.__version__, "prepare_s": round(prepared_s, 1), "scenarios": {}, "skipped": []}
    try:
        report["server"] = server.wait_ready(timeout=900)
        report["ready_s"] = round(time.monotonic() - started - prepared_s, 1)
        ids = [f"{n}/1" for n in warm]
        for name, scenario in plan(args, ids, [f"{n}/1" for n in cold]):
            if time.monotonic() - started > args.budget_s:
                report["skipped"].append(name)
                continue
            before = step_totals(server.url)
            result = asyncio.run(scenario(server.url))
            report["scenarios"][name] = {**(result if isinstance(result, dict) else asdict(result)),
                                         **step_split(before, step_totals(server.url))}
            print(name, json.dumps(report["scenarios"][name])[:200], flush=True)
            report["ratios"] = ratios(report["scenarios"], args, args.adapters)
            out.write_text(json.dumps(report, indent=2))
    finally:
        server.stop()
    report["wall_s"] = round(time.monotonic() - started, 1)
    out.write_text(json.dumps(report, indent=2))
    print("ratios", json.dumps(report.get("ratios")), "skipped", report["skipped"], "->", out)
    return report


if __name__ == "__main__":
    main()
