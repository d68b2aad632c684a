"""Peak host memory while loading an 8B-shaped checkpoint: our streaming loader against
transformers' from_pretrained, each in a fresh process, on the same sharded bf16 files.

    .venv/bin/python bench/load_memory.py --shape llama3.1-8b --dir /tmp/ckpt-8b   # ~16 GB of disk

The checkpoint is written once (weights are zeros: the loaders copy every byte all the same),
with the default model's tokenizer. Results go to bench/results/load_memory-<shape>-<time>.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SHAPES = {  # config.json fields of the published checkpoints
    "llama3.1-8b": dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                        num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                        max_position_embeddings=131072,
                        rope_theta=500000.0, tie_word_embeddings=False,
                        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                          original_max_position_embeddings=8192)),
    "qwen3-8b": dict(model_type="qwen3", hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                     num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=151936,
                     max_position_embeddings=40960, rope_theta=1000000.0, tie_word_embeddings=False),
    "tiny": dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=49152),
}

_LOADERS = {
    "loraserve": "from server.model.decoder import CausalLM\n"
                 "m = CausalLM.from_pretrained(Path(sys.argv[1]), torch.device('cpu'), torch.bfloat16)",
    "transformers": "from transformers import AutoModelForCausalLM\n"
                    "m = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16)",
}
# VmHWM, not ru_maxrss: Linux carries ru_maxrss across exec, so a child would inherit its parent's peak
_MEASURE = """
import sys, time, torch
from pathlib import Path
sys.path.insert(0, {root!r})
def kb(field):
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(field))
base = kb("VmRSS:")
t = time.perf_counter()
{load}
seconds = time.perf_counter() - t
params = sum(p.numel() * p.element_size() for p in set(m.parameters()))
print({{"seconds": seconds, "peak_rss_mb": kb("VmHWM:") / 1024, "rss_before_mb": base / 1024,
        "weights_mb": params / 2**20}})
"""


def write_checkpoint(shape: str, out: Path) -> Path:
    if (out / "model.safetensors.index.json").is_file() or (out / "model.safetensors").is_file():
        return out
    import torch
    from transformers import CONFIG_MAPPING, AutoModelForCausalLM

    from server.model.default_model import default_model_dir

    config = CONFIG_MAPPING[SHAPES[shape]["model_type"]](**SHAPES[shape])
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.to_empty(device="cpu")
    for p in model.parameters():
        p.data.zero_()
    model.save_pretrained(out, max_shard_size="5GB")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (out / name).write_bytes((default_model_dir() / name).read_bytes())
    return out


def measure(loader: str, model_dir: Path) -> dict:
    code = _MEASURE.format(root=str(ROOT), load=_LOADERS[loader])
    out = subprocess.run([sys.executable, "-c", code, str(model_dir)], capture_output=True, text=True, check=True)
    return eval(out.stdout.strip().splitlines()[-1])  # our own subprocess's dict literal


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama3.1-8b")
    parser.add_argument("--dir", type=Path, required=True, help="where the checkpoint is (or will be) written")
    parser.add_argument("--loaders", nargs="+", default=list(_LOADERS), choices=list(_LOADERS))
    args = parser.parse_args()
    started = time.perf_counter()
    model_dir = write_checkpoint(args.shape, args.dir)
    disk_mb = sum(p.stat().st_size for p in model_dir.glob("*.safetensors")) / 2**20
    print(f"checkpoint: {disk_mb:.0f} MB on disk ({time.perf_counter() - started:.0f} s to write or find)")
    results = {}
    for loader in args.loaders:
        results[loader] = measure(loader, model_dir)
        r = results[loader]
        added = r["peak_rss_mb"] - r["rss_before_mb"]  # above the interpreter with torch imported
        r["peak_over_weights"] = added / r["weights_mb"]
        print(f"{loader:13s} {r['seconds']:6.1f} s  peak RSS {r['peak_rss_mb']:8.0f} MB, {added:8.0f} MB above the "
              f"interpreter = {r['peak_over_weights']:.2f} x the weights ({r['weights_mb']:.0f} MB)")
    out = ROOT / "bench" / "results" / f"load_memory-{args.shape}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps({"shape": args.shape, "disk_mb": disk_mb, "results": results}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
