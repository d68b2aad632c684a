"""Interactive latency while a fine-tune runs on the same machine, as ratios against the same load
with no job running, in one invocation.

Starts a server (its own home and adapters dir), measures `--streams` concurrent /generate_stream
requests (EOS ignored), then uploads a dataset and starts a fine-tuning job over the control-plane
API, waits until it is training, and measures the same load again while it trains. The trainer's
threads are `--training-threads` (the server's `training_threads` setting). Results go to
bench/results/serve_while_training-<timestamp>.json.

    .venv/bin/python bench/serve_while_training.py [--streams 4] [--max-new-tokens 64] [--training-threads 1]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.loadgen import run_scenario  # noqa: E402
from bench.throughput import machine  # noqa: E402
from server.model.default_model import DEFAULT_MODEL_NAME, default_model_dir  # noqa: E402
from tests.conftest import ServerProcess  # noqa: E402


def training_rows(count: int) -> str:
    rows = [{"prompt": f"Item {i}: a {['red', 'green', 'blue'][i % 3]} box of size {i % 7}.\nLabel:",
             "completion": f" {['red', 'green', 'blue'][i % 3]}-{i % 7}"} for i in range(count)]
    return "".join(json.dumps(r) + "\n" for r in rows)


def start_fine_tune(url: str, rows: int, epochs: int) -> str:
    """Dataset upload (pre-signed), registration, then the job: the SDK's calls, made with httpx."""
    with httpx.Client(base_url=url, timeout=60) as client:
        begin = client.post("/v2/datasets/upload", json={"fileName": "bench.jsonl", "mimeType": "text/plain"}).json()
        httpx.put(begin["presignedUrl"], content=training_rows(rows).encode()).raise_for_status()
        registered = client.put("/v2/datasets/upload", json={"name": "bench", "uploadToken": begin["uploadToken"]})
        registered.raise_for_status()
        client.post("/v2/repos", json={"name": "bench", "existsOk": True}).raise_for_status()
        params = {"base_model": DEFAULT_MODEL_NAME, "epochs": epochs, "rank": 8, "effective_batch_size": 8,
                  "learning_rate": 0.001}
        job = client.post("/v2/finetuning/jobs", json={"params": params, "dataset": "bench", "repo": "bench"})
        job.raise_for_status()
        return job.json()["uuid"]


def wait_status(url: str, job: str, wanted: set[str], timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = httpx.get(f"{url}/v2/finetuning/jobs/{job}", timeout=30).json()["status"]
        if status in wanted:
            return status
        time.sleep(0.5)
    raise TimeoutError(f"job {job} never reached {wanted}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--training-threads", type=int, default=1)
    parser.add_argument("--rows", type=int, default=400, help="training rows (enough to outlast the measurement)")
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    info = machine()
    with tempfile.TemporaryDirectory() as tmp:
        home, adapters = Path(tmp) / "home", Path(tmp) / "adapters"
        home.mkdir()
        adapters.mkdir()
        (home / "models").symlink_to(default_model_dir().parent, target_is_directory=True)
        env = {"LORASERVE_HOME": str(home), "LORASERVE_ADAPTERS_DIR": str(adapters),
               "LORASERVE_TRAINING_THREADS": str(args.training_threads)}
        server = ServerProcess(env=env, dtype="auto").wait_ready()
        try:
            idle = asyncio.run(run_scenario(server.url, args.streams, args.max_new_tokens, args.rounds))
            job = start_fine_tune(server.url, args.rows, args.epochs)
            wait_status(server.url, job, {"training"}, 120)
            time.sleep(5)  # past the trainer's start-up (model load) into its steady steps
            training = asyncio.run(run_scenario(server.url, args.streams, args.max_new_tokens, args.rounds))
            still = httpx.get(f"{server.url}/v2/finetuning/jobs/{job}", timeout=30).json()["status"]
            httpx.post(f"{server.url}/v2/finetuning/jobs/{job}/cancel", timeout=30)
        finally:
            server.stop()
    result = {"machine": info, "args": vars(args), "idle": asdict(idle), "training": asdict(training),
              "job_status_after_measurement": still,
              "ratios": {"itl_p50": round(training.itl_p50_ms / idle.itl_p50_ms, 2),
                         "itl_p99": round(training.itl_p99_ms / idle.itl_p99_ms, 2),
                         "tokens_per_s": round(training.tokens_per_s / idle.tokens_per_s, 2)}}
    out = ROOT / "bench" / "results" / f"serve_while_training-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    print(f"saved {out}")


if __name__ == "__main__":
    main()
