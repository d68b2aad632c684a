"""Decode-step time against the memory-bandwidth floor, base model vs a mix of adapters.

Runs the engine's own model, KV cache, LoRA tier and runner (no HTTP) on random weights in a
realistic shape; throughput does not depend on the weight values, and EOS is never checked.

  python bench/gpu_decode.py                                           # Llama-3-8B shape, bf16, CUDA
  python bench/gpu_decode.py --shape tiny --device cpu --dtype float32  # seconds; what CI runs

The floor of one decode step is the bytes it must read (every weight once, plus the KV cache of
every sequence, plus the packed LoRA columns the step uses) over the copy bandwidth measured here.
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from server.adapters.lora import ResidentAdapters  # noqa: E402
from server.adapters.weights import AdapterKey, AdapterWeights  # noqa: E402
from server.engine.cuda_graphs import DecodeGraphs  # noqa: E402
from server.engine.kv_cache import KVCache  # noqa: E402
from server.engine.request import Request, SamplingParams, StopCriteria  # noqa: E402
from server.engine.runner import ModelRunner  # noqa: E402
from server.engine.scheduler import BatchPlan, StepKind  # noqa: E402
from server.kernels import elementwise, lora_triton  # noqa: E402
from server.model.arch import ArchConfig  # noqa: E402
from server.model.decoder import CausalLM, prefer_planless_attention  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"

SHAPES = {  # HF config.json fields
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, max_position_embeddings=8192),
    "qwen3-8b": dict(model_type="qwen3", hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                     num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=151936,
                     rope_theta=1000000.0, max_position_embeddings=40960, rms_norm_eps=1e-6),
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, rope_theta=100000.0, max_position_embeddings=8192,
                         tie_word_embeddings=True),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, max_position_embeddings=2048),
}


@dataclass(frozen=True)
class BenchConfig:
    shape: str
    device: str
    dtype: str
    batches: tuple[int, ...]
    adapters: int
    rank: int
    context: int
    steps: int
    warmup: int
    graphs: bool  # CUDA only: also time decode replayed from CUDA graphs
    torch_ops: bool = False  # also time base steps with the fused elementwise kernels off (torch ops)


@dataclass(frozen=True)
class StepResult:
    batch: int
    mode: str  # base | mixed | base-torch-ops (the fused elementwise kernels off)
    graphs: bool
    step_ms: float
    tokens_per_s: float
    floor_ms: float
    replay_ms: Optional[float] = None  # graphs: the same step's graph replayed back to back (the GPU's time alone)

    @property
    def over_floor(self) -> float:
        return self.step_ms / self.floor_ms


def build_model(cfg: BenchConfig) -> CausalLM:
    arch = ArchConfig.from_hf({"model_type": "llama", **SHAPES[cfg.shape]})
    torch.manual_seed(0)
    if cfg.device == "cuda":
        prefer_planless_attention()
    default = torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, cfg.dtype))
    try:
        with torch.device(cfg.device):
            model = CausalLM(arch)  # random init, made on the device itself
    finally:
        torch.set_default_dtype(default)
    with torch.no_grad():  # (the projections are made uninitialised: on a GPU, zeros, so every logit was 0)
        for parameter in model.parameters():
            if parameter.dim() == 2:
                parameter.normal_(0.0, 0.02)
    if arch.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.init_rotaries(torch.device(cfg.device))
    return model.eval()


def random_adapters(model: CausalLM, count: int, rank: int) -> list[AdapterWeights]:
    """`count` rank-`rank` adapters on every projection of every layer (the heaviest LoRA case)."""
    adapters = []
    for i in range(count):
        modules = {key: (torch.randn(rank, t.in_features) * 0.01, torch.randn(t.out_features, rank) * 0.01)
                   for key, t in model.lora_targets().items()}
        adapters.append(AdapterWeights(AdapterKey("local", f"random-{i}"), rank, modules))
    return adapters


def copy_bandwidth(device: torch.device, megabytes: int = 1024) -> float:
    """Bytes per second a device copy moves (read + write), the best of several runs."""
    src = torch.empty(megabytes * 2**20, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(10):
        sync(device)
        started = time.perf_counter()
        dst.copy_(src)
        sync(device)
        best = min(best, time.perf_counter() - started)
    return 2 * src.numel() / best


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_requests(batch: int, context: int, vocab: int, adapters: list[AdapterWeights]) -> list[Request]:
    requests = []
    for i in range(batch):
        prompt = torch.randint(0, vocab, (context,)).tolist()
        request = Request(prompt_ids=prompt, params=SamplingParams(), detokenizer=None, sink=lambda event: None,
                          stop=StopCriteria(max_new_tokens=1 << 20, ignore_eos=True),
                          adapter=adapters[i % len(adapters)] if adapters else None)
        request.slot = i
        requests.append(request)
    return requests


def run_decode(runner: ModelRunner, requests: list[Request], cfg: BenchConfig) -> float:
    """Prefill the batch, then time `steps` decode steps; returns seconds per step."""
    prefill(runner, requests, cfg)
    decode(runner, requests, cfg.warmup)
    sync(runner.device)
    started = time.perf_counter()
    decode(runner, requests, cfg.steps)
    sync(runner.device)
    return (time.perf_counter() - started) / cfg.steps


def replay_seconds(runner: ModelRunner, steps: int) -> float:
    """The last replayed decode graph, back to back with no host work between: the GPU's time per step."""
    graph = runner.graphs.last.graph
    sync(runner.device)
    started = time.perf_counter()
    for _ in range(steps):
        graph.replay()
    sync(runner.device)
    return (time.perf_counter() - started) / steps


def prefill(runner: ModelRunner, requests: list[Request], cfg: BenchConfig) -> None:
    runner.kv.ensure_capacity(cfg.context + cfg.warmup + cfg.steps + 1)
    for request in requests:  # one prefill each keeps the prefill budget out of the picture
        next_ids = runner.run(BatchPlan(StepKind.PREFILL, (request,))).argmax(-1)
        request.output_ids.append(int(next_ids[0]))


def decode(runner: ModelRunner, requests: list[Request], steps: int) -> None:
    plan = BatchPlan(StepKind.DECODE, tuple(requests))
    for _ in range(steps):
        next_ids = runner.run(plan).argmax(-1).tolist()  # [batch]; the host needs them, as in serving
        for request, token in zip(requests, next_ids):
            request.output_ids.append(token)


def floor_seconds(model: CausalLM, batch: int, cfg: BenchConfig, bandwidth: float, lora_columns: int) -> float:
    element = torch.finfo(getattr(torch, cfg.dtype)).bits // 8
    weights = sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n) * element
    if model.config.tie_word_embeddings:
        weights += model.lm_head.weight.numel() * element
    kv_per_token = 2 * model.config.num_layers * model.config.num_kv_heads * model.config.head_dim * element
    kv = batch * (cfg.context + cfg.warmup + cfg.steps // 2) * kv_per_token
    lora = lora_columns * sum(t.in_features + t.out_features for t in model.lora_targets().values()) * element
    return (weights + kv + lora) / bandwidth


def build_parts(cfg: BenchConfig, max_adapters: int) -> tuple[CausalLM, KVCache, ResidentAdapters]:
    model = build_model(cfg)
    kv = KVCache(model.config, max(cfg.batches), cfg.context + cfg.warmup + cfg.steps + 1, torch.device(cfg.device),
                 getattr(torch, cfg.dtype))
    return model, kv, ResidentAdapters(model, max_adapters, 1 << 40)


def run(cfg: BenchConfig) -> dict:
    device = torch.device(cfg.device)
    model, kv, resident = build_parts(cfg, cfg.adapters)
    adapters = random_adapters(model, cfg.adapters, cfg.rank)
    for adapter in adapters:
        assert resident.activate(adapter, pinned=set())
    runners = {False: ModelRunner(model, kv, resident, device)}
    if cfg.graphs and device.type == "cuda":
        runners[True] = ModelRunner(model, kv, resident, device, DecodeGraphs(model, kv, resident, max(cfg.batches)))
    plain = {graphed: ModelRunner(model, kv, resident, device, runner.graphs and DecodeGraphs(
        model, kv, resident, max(cfg.batches))) for graphed, runner in runners.items()} if cfg.torch_ops else {}
    bandwidth = copy_bandwidth(device)
    results = []
    with torch.inference_mode():
        verified = verify_graphs(runners, model, adapters, cfg) if True in runners else None
        for batch in cfg.batches:
            arms = [*itertools.product((("base", []), ("mixed", adapters)), runners.items()),
                    *((("base-torch-ops", []), item) for item in plain.items())]
            for (mode, mix), (graphed, runner) in arms:
                elementwise.ENABLED = mode != "base-torch-ops"  # (its own runner: graphs captured without them)
                seconds = run_decode(runner, make_requests(batch, cfg.context, model.config.vocab_size, mix), cfg)
                replay = replay_seconds(runner, cfg.steps) if graphed else None
                elementwise.ENABLED = True
                columns = min(batch, len(mix)) * cfg.rank
                floor = floor_seconds(model, batch, cfg, bandwidth, columns)
                results.append(StepResult(batch, mode, graphed, seconds * 1e3, batch / seconds, floor * 1e3,
                                          replay and replay * 1e3))
                engine = "graphs" if graphed else "eager"
                alone = f"; replayed alone {replay * 1e3:.2f} ms ({replay / floor:.2f}x)" if replay else ""
                print(f"batch {batch:3d} {mode:14s} {engine:6s}: {seconds * 1e3:8.2f} ms/step  "
                      f"{batch / seconds:9.1f} tok/s  floor {floor * 1e3:7.2f} ms ({seconds / floor:.2f}x){alone}",
                      flush=True)
    return {**report(cfg, model, bandwidth, results), "graphs_vs_eager": verified}


def verify_graphs(runners: dict[bool, ModelRunner], model: CausalLM, adapters: list[AdapterWeights],
                  cfg: BenchConfig, rows: int = 3, steps: int = 4) -> dict:
    """The graphed decode step computes what the eager one does: same rows (mixed adapters and a
    base row, padded to a bucket), same KV; largest relative difference of the logits over a few steps."""
    requests = make_requests(rows, 16, model.config.vocab_size, [*adapters[: rows - 1], None])
    eager, graphed = runners[False], runners[True]
    eager.kv.ensure_capacity(16 + steps + 1)
    for request in requests:
        request.output_ids.append(int(eager.run(BatchPlan(StepKind.PREFILL, (request,))).argmax(-1)[0]))
    plan, worst, same_argmax = BatchPlan(StepKind.DECODE, tuple(requests)), 0.0, True
    planner, torch_worst = eager.adapters.planner, 0.0
    for _ in range(steps):  # all write the same K/V at the same place, so running each is harmless
        if planner.triton:  # the Triton kernels against torch's masked window, eager
            planner.triton = False
            reference = eager.run(plan).float()
            planner.triton = True
        expected = eager.run(plan).float()
        if float(expected.std()) == 0.0:
            raise RuntimeError("constant logits: the comparison below could not fail (weights not initialised?)")
        if planner.triton:
            torch_worst = max(torch_worst, float((expected - reference).norm() / reference.norm()))
        got = graphed.run(plan).float()
        worst = max(worst, float((got - expected).norm() / expected.norm()))
        same_argmax &= bool((got.argmax(-1) == expected.argmax(-1)).all())
        for request, token in zip(requests, expected.argmax(-1).tolist()):
            request.output_ids.append(token)
    print(f"graphs vs eager: worst relative logit difference {worst:.2e}, same argmax {same_argmax}; "
          f"Triton LoRA vs torch's masked window: {torch_worst:.2e}", flush=True)
    return {"worst_relative_difference": worst, "same_argmax": same_argmax,
            "triton_vs_masked_window": torch_worst if planner.triton else None}


def profile(cfg: BenchConfig) -> None:
    """Where a decode step's time goes: the first batch size, eager, base model and a mix of
    `cfg.adapters` adapters (kernel by kernel: a graph replays the same kernels)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    device = torch.device(cfg.device)
    model, kv, resident = build_parts(cfg, cfg.adapters)
    adapters = random_adapters(model, cfg.adapters, cfg.rank)
    for adapter in adapters:
        assert resident.activate(adapter, pinned=set())
    runners = {"eager": ModelRunner(model, kv, resident, device)}
    if cfg.graphs and device.type == "cuda":
        graphs = DecodeGraphs(model, kv, resident, max(cfg.batches))
        runners["graphs"] = ModelRunner(model, kv, resident, device, graphs)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    order = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    for (mode, mix), (engine, runner) in itertools.product((("base", []), ("mixed", adapters)), runners.items()):
        requests = make_requests(cfg.batches[0], cfg.context, model.config.vocab_size, mix)
        with torch.inference_mode():
            prefill(runner, requests, cfg)
            decode(runner, requests, cfg.warmup)
            sync(device)
            started = time.perf_counter()
            with torch_profile(activities=activities) as prof:
                decode(runner, requests, cfg.steps)
                sync(device)
            wall = (time.perf_counter() - started) / cfg.steps
        events = prof.key_averages()
        kernels = sum(e.self_device_time_total for e in events if e.device_type.name == "CUDA") / cfg.steps
        print(f"--- {mode}, {engine}, batch {cfg.batches[0]}, {cfg.steps} steps: {wall * 1e3:.2f} ms a step "
              f"(profiled), kernels {kernels / 1e3:.2f} ms a step")
        print(events.table(sort_by=order, row_limit=30))


def report(cfg: BenchConfig, model: CausalLM, bandwidth: float, results: list[StepResult]) -> dict:
    by_key = {(r.batch, r.mode, r.graphs): r for r in results}
    best = max(r.graphs for r in results)  # graphed numbers where they were taken
    mixed_vs_base = {b: by_key[(b, "mixed", best)].tokens_per_s / by_key[(b, "base", best)].tokens_per_s
                     for b in cfg.batches}
    device_name = torch.cuda.get_device_name() if cfg.device == "cuda" else platform.processor() or "cpu"
    return {
        "config": asdict(cfg),
        "device_name": device_name,
        "torch": torch.__version__,
        "commit": _commit(),
        "parameters": sum(p.numel() for p in model.parameters()),
        "copy_bandwidth_gb_s": bandwidth / 1e9,
        "results": [{**asdict(r), "over_floor": r.over_floor} for r in results],
        "mixed_vs_base": mixed_vs_base,
        "lora_kernels": {"target_programs": lora_triton.TARGET_PROGRAMS, "expand_block": lora_triton.EXPAND_BLOCK},
    }


def _commit() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--batches", default="1,8,32,64")
    parser.add_argument("--adapters", type=int, default=16)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--no-graphs", dest="graphs", action="store_false", help="eager decode only")
    parser.add_argument("--torch-ops", action="store_true",
                        help="also time base steps with the fused elementwise kernels off (torch ops)")
    parser.add_argument("--lora-target-programs", type=int, default=None,
                        help="the LoRA shrink's program target (lora_triton.TARGET_PROGRAMS) for this run")
    parser.add_argument("--lora-expand-block", type=int, default=None,
                        help="the LoRA expand's output columns per program (lora_triton.EXPAND_BLOCK)")
    parser.add_argument("--profile", action="store_true", help="print a torch.profiler table of the decode steps")
    parser.add_argument("--out", type=Path, default=None, help="result JSON (default: bench/results/...)")
    args = parser.parse_args(argv)
    if args.lora_target_programs:
        lora_triton.TARGET_PROGRAMS = args.lora_target_programs
    if args.lora_expand_block:
        lora_triton.EXPAND_BLOCK = args.lora_expand_block
    cfg = BenchConfig(args.shape, args.device, args.dtype, tuple(int(b) for b in args.batches.split(",")),
                      args.adapters, args.rank, args.context, args.steps, args.warmup, args.graphs, args.torch_ops)
    if args.profile:
        profile(cfg)
        return {}
    result = run(cfg)
    out = args.out or RESULTS / f"gpu_decode-{cfg.shape}-{cfg.device}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
