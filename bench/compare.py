"""loraserve against its peers, side by side in one run: same model, prompts, token budget and threads.

Peers: llama.cpp's llama-server (bench/peers/llama_server.sh), vLLM's CPU build (bench/peers/vllm.sh)
and the naive baseline (transformers + peft, one request at a time, set_adapter per request). Each
server runs alone on its own loopback port, is stopped before the next starts, and gets the same
load through the OpenAI /v1/completions stream with EOS ignored. Peers whose build is missing are
skipped and say so.

    .venv/bin/python bench/compare.py                       # all peers, 1/8/32 streams, 8 adapters
    .venv/bin/python bench/compare.py --peers loraserve naive --concurrency 1 8

Writes bench/results/compare-<stamp>.json and a PNG plot next to it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import httpx
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.loadgen import PROMPTS, StreamResult, percentile, summarize, wait_ready  # noqa: E402
from bench.lora_mix import make_adapters, naive_peft_baseline  # noqa: E402
from bench.structured import LONG_SCHEMA  # noqa: E402
from bench.structured import PROMPT as JSON_PROMPT  # noqa: E402
from bench.throughput import machine  # noqa: E402
from server.model.default_model import default_model_dir, loraserve_home  # noqa: E402
from tests.conftest import ServerProcess, free_port, stop_process  # noqa: E402

PEERS_HOME = Path(os.environ.get("PEERS_HOME", Path.home() / ".cache" / "loraserve" / "peers"))
BASE = None  # adapter slot meaning "the base model"
BASE_MODEL = "SmolLM2-135M-Instruct"
CHAT_PROMPT = JSON_PROMPT.replace("ocean", "forest")  # as many tokens


@dataclass
class Peer:
    """One server under test: how to start it, and how a request names an adapter."""

    name: str
    threads: int
    adapters: list[str] = field(default_factory=list)  # adapter names as this peer's requests use them
    proc: Optional[subprocess.Popen] = None
    url: str = ""

    def available(self) -> Optional[str]:
        """None if it can run here, else why not."""
        return None

    def start(self, adapters_dir: Path, names: list[str]) -> None:
        raise NotImplementedError

    def body(self, prompt: str, max_tokens: int, adapter: Optional[int]) -> dict:
        """adapter: an index into `adapters`, or None for the base model."""
        model = self.adapters[adapter] if adapter is not None else BASE_MODEL
        return {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True}

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, timeout=30)

    def _spawn(self, script: Path, extra: list[str], env: Optional[dict] = None) -> None:
        """`script start PORT THREADS extra...` in the background; returns once it answers."""
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        log = open(ROOT / ".pytest_cache" / f"{self.name}-{port}.log", "w")
        self.proc = subprocess.Popen([str(script), "start", str(port), str(self.threads), *extra],
                                     stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
        wait_ready(self.url + "/v1/models", self.proc, timeout=600)


class Loraserve(Peer):
    device_slots = 8  # max_active_adapters: the uniform mix fits, the churn scenario does not
    extra_args: tuple[str, ...] = ()
    def start(self, adapters_dir: Path, names: list[str]) -> None:
        self.adapters = [f"{n}/1" for n in names]
        server = ServerProcess("--threads", str(self.threads), "--max-batch-size", "32",
                               "--max-active-adapters", str(self.device_slots), *self.extra_args,
                               env={"LORASERVE_ADAPTERS_DIR": str(adapters_dir)}, dtype="auto").wait_ready(timeout=600)
        self.proc, self.url = server.proc, server.url

    def body(self, prompt: str, max_tokens: int, adapter: Optional[int]) -> dict:
        return {**super().body(prompt, max_tokens, adapter), "ignore_eos_token": True}

    def json_body(self, max_tokens: int, adapter: Optional[int], constrained: bool = True) -> dict:
        """A chat request constrained to LONG_SCHEMA (the grammar stays open for the whole budget);
        unconstrained: a request as long without response_format (41 tokens with the chat template,
        against 5-12 for the plain prompts, so only this isolates the grammar's cost), on another
        topic so that it reuses no cached prefix of the constrained run's beyond the system prompt."""
        schema = {"type": "json_schema", "json_schema": {"name": "notes", "schema": LONG_SCHEMA}}
        body = {"model": self.adapters[adapter] if adapter is not None else BASE_MODEL, "stream": True,
                "messages": [{"role": "user", "content": JSON_PROMPT if constrained else CHAT_PROMPT}],
                "max_tokens": max_tokens,
                "temperature": 0}
        return {**body, "response_format": schema} if constrained else {**body, "ignore_eos_token": True}


class LlamaServer(Peer):
    """llama.cpp: per-request LoRA by index into the adapters loaded at start (scale 0 unless asked)."""

    script = ROOT / "bench" / "peers" / "llama_server.sh"

    def available(self) -> Optional[str]:
        built = PEERS_HOME / "llama.cpp" / "bin" / "llama-server"
        return None if built.exists() else f"not built ({built}); run {self.script} install"

    def start(self, adapters_dir: Path, names: list[str]) -> None:
        files = []
        for name in names:
            files.append(str(adapters_dir / f"{name}.gguf"))
            subprocess.run([str(self.script), "convert", str(adapters_dir / name / "1"), files[-1]], check=True,
                           capture_output=True)
        self.adapters = [str(i) for i in range(len(names))]
        self._spawn(self.script, ["--lora", ",".join(files)])  # repeated --lora keeps only the last

    def body(self, prompt: str, max_tokens: int, adapter: Optional[int]) -> dict:
        # Every loaded adapter is named: ids left out keep their start-up scale (1.0 in this version)
        scales = [{"id": i, "scale": 1.0 if i == adapter else 0.0} for i in range(len(self.adapters))]
        return {**super().body(prompt, max_tokens, None), "ignore_eos": True, "lora": scales}


class Vllm(Peer):
    script = ROOT / "bench" / "peers" / "vllm.sh"

    def available(self) -> Optional[str]:
        python = PEERS_HOME / "vllm" / "bin" / "python"
        return None if python.exists() else f"not installed ({python}); run {self.script} install"

    def start(self, adapters_dir: Path, names: list[str]) -> None:
        self.adapters = list(names)
        modules = [f"{n}={adapters_dir / n / '1'}" for n in names]
        env = {"VLLM_MAX_LORA_RANK": "8", "VLLM_MAX_LORAS": str(len(names))}
        self._spawn(self.script, ["--lora-modules", *modules, "--max-num-seqs", "32"], env)

    def body(self, prompt: str, max_tokens: int, adapter: Optional[int]) -> dict:
        return {**super().body(prompt, max_tokens, adapter), "ignore_eos": True}


class LoraserveInt8(Loraserve):
    """The same server with `--quantize int8` (bf16 activations, int8 weights for small decode steps)."""

    extra_args = ("--quantize", "int8", "--dtype", "bfloat16")


PEERS = {"loraserve": Loraserve, "loraserve-int8": LoraserveInt8, "llama-server": LlamaServer, "vllm": Vllm}


async def openai_stream(client: httpx.AsyncClient, body: dict) -> StreamResult:
    """One streamed (chat) completion; each SSE chunk carrying text counts as one token."""
    start, stamps = time.perf_counter(), []
    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    try:
        async with client.stream("POST", path, json=body) as response:
            if response.status_code != 200:
                return StreamResult(0, 0, [], 0, f"HTTP {response.status_code}: {(await response.aread())[:200]!r}")
            async for line in response.aiter_lines():
                if line.startswith("data:") and line.strip() != "data: [DONE]":
                    choices = json.loads(line[5:]).get("choices") or []
                    if choices and (choices[0].get("text") or (choices[0].get("delta") or {}).get("content")):
                        stamps.append(time.perf_counter())
    except httpx.HTTPError as exc:
        return StreamResult(len(stamps), 0, [], 0, repr(exc))
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    return StreamResult(len(stamps), stamps[0] - start if stamps else 0, gaps, time.perf_counter() - start)


async def load(peer: Peer, streams: int, max_tokens: int, adapters: list[Optional[int]],
               warm: Optional[list[Optional[int]]] = None, json_every: int = 0, constrained: bool = True) -> dict:
    """`streams` concurrent requests, stream i on adapters[i % len(adapters)] (every `json_every`-th
    one JSON-constrained); the adapters in `warm` (default: all used) get one short request first."""
    async with httpx.AsyncClient(base_url=peer.url, timeout=900,
                                 limits=httpx.Limits(max_connections=streams + 4)) as client:
        warm = set(adapters) if warm is None else set(warm)
        await asyncio.gather(*(openai_stream(client, peer.body(PROMPTS[0], 2, a)) for a in warm))
        bodies = [peer.json_body(max_tokens, adapters[i % len(adapters)], constrained)
                  if json_every and i % json_every == 0
                  else peer.body(PROMPTS[i % len(PROMPTS)], max_tokens, adapters[i % len(adapters)])
                  for i in range(streams)]
        start = time.perf_counter()
        results = await asyncio.gather(*(openai_stream(client, body) for body in bodies))
        wall = time.perf_counter() - start
    scenario = asdict(summarize(streams, list(results), wall))
    scenario["request_p50_ms"] = round(1000 * percentile([r.total_s for r in results if not r.error], 0.5), 1)
    scenario["request_p99_ms"] = round(1000 * percentile([r.total_s for r in results if not r.error], 0.99), 1)
    scenario["first_error"] = next((r.error for r in results if r.error), None)
    return scenario


def run_peer(peer: Peer, adapters_dir: Path, names: list[str], args: argparse.Namespace) -> dict:
    peer.start(adapters_dir, names)
    try:
        scenarios = {}
        for streams in args.concurrency:
            scenarios[f"base-{streams}"] = asyncio.run(load(peer, streams, args.max_new_tokens, [BASE]))
            print(f"{peer.name:>13} base  x{streams:<3} {scenarios[f'base-{streams}']['tokens_per_s']:>8} tok/s",
                  flush=True)
        uniform = list(range(args.adapters))
        scenarios[f"mixed-{args.mixed_streams}x{args.adapters}"] = asyncio.run(
            load(peer, args.mixed_streams, args.max_new_tokens, uniform))
        if type(peer) is Loraserve:
            scenarios.update(loraserve_only(peer, names, args))
        for key, scenario in scenarios.items():
            if not key.startswith("base-"):
                print(f"{peer.name:>13} {key:<16} {scenario['tokens_per_s']:>8} tok/s", flush=True)
        return scenarios
    finally:
        peer.stop()


def loraserve_only(peer: Peer, names: list[str], args: argparse.Namespace) -> dict:
    """Scenarios the peers can't run the same way: a Zipf mix of adapters, a JSON-constrained mix,
    and churn over three times as many adapters as device slots (each first use is a cold load)."""
    zipf = random.Random(0).choices(range(args.adapters), weights=[1 / (k + 1) ** 1.1 for k in range(args.adapters)],
                                    k=args.mixed_streams)
    churn = list(range(args.adapters, len(names)))
    return {
        f"zipf-{args.mixed_streams}x{args.adapters}": asyncio.run(
            load(peer, args.mixed_streams, args.max_new_tokens, zipf)),
        f"json-half-{args.mixed_streams}x{args.adapters}": asyncio.run(
            load(peer, args.mixed_streams, args.max_new_tokens, list(range(args.adapters)), json_every=2)),
        f"chat-half-{args.mixed_streams}x{args.adapters}": asyncio.run(  # json-half without its grammar (after it: its
            # first prompt block, the system prompt, is then cached, which favours this run)
            load(peer, args.mixed_streams, args.max_new_tokens, list(range(args.adapters)), json_every=2,
                 constrained=False)),
        f"churn-{args.mixed_streams}x{len(churn)}-cold": asyncio.run(
            load(peer, args.mixed_streams, args.max_new_tokens, churn, warm=[])),
    }


def plot(report: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, scenarios in report["peers"].items():
        if not isinstance(scenarios, dict) or "skipped" in scenarios:
            continue
        levels = [int(k.split("-")[1]) for k in scenarios if k.startswith("base-")]
        left.plot(levels, [scenarios[f"base-{c}"]["tokens_per_s"] for c in levels], marker="o", label=name)
    naive = report.get("naive_peft")
    if naive:
        left.axhline(naive["tokens_per_s"], color="grey", linestyle="--", label="transformers+peft, sequential")
    left.set(xscale="log", xlabel="concurrent streams (base model)", ylabel="aggregate tokens/s",
             title="Decode throughput")
    left.set_xticks(report["config"]["concurrency"], [str(c) for c in report["config"]["concurrency"]])
    left.legend()
    mixed_key = f"mixed-{report['config']['mixed_streams']}x{report['config']['adapters']}"
    names, values = [], []
    for name, scenarios in report["peers"].items():
        if isinstance(scenarios, dict) and mixed_key in scenarios:
            names.append(name)
            values.append(scenarios[mixed_key]["tokens_per_s"])
    if naive:
        names.append("naive peft")
        values.append(naive["tokens_per_s"])
    right.bar(names, values, color=[f"C{i}" if n != "naive peft" else "grey" for i, n in enumerate(names)])
    right.tick_params(axis="x", labelrotation=15, labelsize=8)
    right.set(ylabel="aggregate tokens/s", title=f"{report['config']['mixed_streams']} streams over "
              f"{report['config']['adapters']} adapters")
    fig.suptitle(f"SmolLM2-135M, threads: {report['config']['threads']} each, {report['config']['max_new_tokens']} "
                 f"new tokens, EOS ignored (commit {report['machine']['commit']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main(argv: Optional[list[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peers", nargs="+", default=["loraserve", "loraserve-int8", "llama-server", "vllm", "naive"])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--mixed-streams", type=int, default=32)
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--churn-adapters", type=int, default=24, help="cold adapters for loraserve's churn run")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--naive-requests", type=int, default=8)
    parser.add_argument("--loraserve-args", nargs="*", default=[],
                        help="more `serve` flags for loraserve, e.g. --loraserve-args=--no-prefix-caching")
    parser.add_argument("--out-dir", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args(argv)
    (ROOT / ".pytest_cache").mkdir(exist_ok=True)
    names = [f"bench-{i}" for i in range(args.adapters)]
    report = {"benchmark": "compare", "machine": machine(), "command": " ".join(sys.argv),
              "config": {k: v for k, v in vars(args).items() if k != "out_dir"}, "peers": {}}
    report["config"]["model_dir"] = str(default_model_dir())
    with tempfile.TemporaryDirectory(dir=loraserve_home()) as tmp:
        adapters_dir = Path(tmp)
        churn = [f"churn-{i}" for i in range(args.churn_adapters)]  # loraserve only
        make_adapters(adapters_dir, default_model_dir(), names + churn, args.rank)
        for name in args.peers:
            if name == "naive":
                torch.set_num_threads(args.threads)
                report["naive_peft"] = naive_peft_baseline(default_model_dir(), adapters_dir, names,
                                                           args.naive_requests, args.max_new_tokens)
                print(f"{'naive peft':>13} sequential {report['naive_peft']['tokens_per_s']:>8} tok/s", flush=True)
                continue
            peer = PEERS[name](name, args.threads)
            why_not = peer.available()
            served = names
            if isinstance(peer, Loraserve):
                served, peer.device_slots = names + churn, args.adapters
                peer.extra_args = (*peer.extra_args, *args.loraserve_args)
            report["peers"][name] = {"skipped": why_not} if why_not else run_peer(peer, adapters_dir, served, args)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    out = args.out_dir / f"compare-{stamp}.json"
    out.write_text(json.dumps(report, indent=2))
    plot(report, out.with_suffix(".png"))
    print(f"saved {out} and {out.with_suffix('.png').name}")
    return report


if __name__ == "__main__":
    main()
