"""The benchmark scripts stay runnable: the GPU decode benchmark on a tiny random model on CPU."""

from __future__ import annotations

import json

import pytest

from bench import gpu_decode


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
