"""The benchmark scripts stay runnable: the GPU decode benchmark and the GPU node's end-to-end
serving run (bench/gpu/run.sh), each on a tiny random model on CPU; the CPU LoRA projections', and
the CPU decode steps in one call against the layer loop."""

from __future__ import annotations

import json

import pytest

from bench import fused_decode, gpu_decode, gpu_lora_kernels, gpu_serve, lora_fold
from server.kernels.native import linear_kernel


def test_gpu_decode_runs_on_cpu_with_a_tiny_model(tmp_path):
    out = tmp_path / "result.json"
    result = gpu_decode.main(["--shape", "tiny", "--device", "cpu", "--dtype", "float32", "--batches", "1,3",
                              "--adapters", "2", "--rank", "4", "--context", "8", "--steps", "3", "--warmup", "1",
                              "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["mixed_vs_base"] == {str(b): v for b, v in result["mixed_vs_base"].items()}
    rows = {(r["batch"], r["mode"]): r for r in saved["results"]}
    assert set(rows) == {(1, "base"), (1, "mixed"), (3, "base"), (3, "mixed")}
    for row in rows.values():
        assert row["step_ms"] > 0 and row["floor_ms"] > 0
        assert row["tokens_per_s"] == pytest.approx(row["batch"] * 1000 / row["step_ms"])
    assert saved["copy_bandwidth_gb_s"] > 0
    torch_ops = gpu_decode.main(["--shape", "tiny", "--device", "cpu", "--dtype", "float32", "--batches", "2",
                                 "--adapters", "2", "--rank", "4", "--context", "8", "--steps", "2", "--warmup", "1",
                                 "--torch-ops", "--out", str(out)])
    assert {r["mode"] for r in torch_ops["results"]} == {"base", "mixed", "base-torch-ops"}


def test_the_lora_kernel_sweep_runs_interpreted(tmp_path):
    pytest.importorskip("triton")
    out = tmp_path / "sweep.json"
    report = gpu_lora_kernels.main(["--device", "cpu", "--rows", "3", "--adapters", "2", "--layers", "1",
                                    "--repeats", "1", "--targets", "256,2048", "--expand-blocks", "64",
                                    "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    assert [(r["target_programs"], r["expand_block"]) for r in report["results"]] == [(256, 64), (2048, 64)]
    assert all(r["us_per_layer"] > 0 for r in report["results"])


def test_the_gpu_serving_run_works_cpu_sized(tmp_path):
    """bench/gpu_serve.py end to end on CPU: a random checkpoint whose vocabulary is larger than its
    tokenizer's, random adapters, the real server, every scenario, no request failing."""
    out = tmp_path / "serve.json"
    report = gpu_serve.main(["--shape", "tiny-serve", "--dir", str(tmp_path / "ckpt"), "--device", "cpu",
                             "--concurrency", "1", "8", "--max-new-tokens", "12", "--adapters", "3", "--cold", "2",
                             "--rank", "4", "--json-streams", "4", "--churn-streams", "3", "--out", str(out)])
    assert json.loads(out.read_text())["scenarios"] == report["scenarios"]
    assert report["skipped"] == []
    assert set(report["scenarios"]) == {"base-1", "mixed3-1", "base-8", "mixed3-8", "zipf3-8", "plain-4",
                                        "json-half-4", "cold-churn"}
    for name, scenario in report["scenarios"].items():
        parts = ("steady", "warm_arrivals", "cold_arrivals")
        for run in [scenario[k] for k in parts] if name == "cold-churn" else [scenario]:
            assert run["errors"] == 0 and run["tokens"] > 0, (name, run)
    assert report["scenarios"]["base-8"]["tokens"] == 8 * 12  # every token counts, texts or not
    assert set(report["ratios"]) == {"mixed3_vs_base_at_8", "json_half_vs_plain_at_4",
                                     "cold_loads_itl_p99_vs_warm_arrivals"}


@pytest.mark.skipif(linear_kernel() is None, reason="no AVX512-BF16 or no C compiler here")
def test_the_folded_lora_benchmark_runs_one_layer(tmp_path):
    report = lora_fold.main(["--rows", "5", "--adapters", "2", "--rounds", "2", "--layers", "1",
                             "--out-dir", str(tmp_path)])
    saved = json.loads(next(tmp_path.glob("lora_fold-*.json")).read_text())
    assert saved == json.loads(json.dumps(report))
    assert set(report["summary"]) == {"base", "folded", "separate"}
    assert all(row["min_ms"] > 0 for row in report["summary"].values())


@pytest.mark.skipif(linear_kernel() is None, reason="no AVX512-BF16 or no C compiler here")
def test_the_one_call_decode_benchmark_runs_small(tmp_path):
    report = fused_decode.main(["--rows", "2", "--adapters", "2", "--rounds", "1", "--new-tokens", "4",
                                "--out-dir", str(tmp_path)])
    saved = json.loads(next(tmp_path.glob("fused_decode-*.json")).read_text())
    assert saved == json.loads(json.dumps(report))
    assert set(report["summary"]) == {"base-2", "mixed-2x2"}
    assert all(run["one_call_ms"]["min"] > 0 and run["loop_ms"]["min"] > 0 for run in report["summary"].values())
