"""The Predibase notebook against a live server, through the real SDK (tests/clients/notebook.py):
repos, datasets, a fine-tune that really learns a format, serving it, cancel, download/upload,
archive/delete and batch inference. Outputs are checked against peft on the saved adapter.
"""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
from pathlib import Path

import pytest

from tests.adapter_factory import peft_greedy
from tests.conftest import ROOT, ServerProcess

CLIENT_PYTHON = ROOT / ".venv-clients" / "bin" / "python"
KEY = "pb_notebook-test-key"
NAMES = ["Alice", "Bruno", "Chen", "Dana", "Emil", "Farah", "Goran", "Hana", "Ivo", "Jana", "Kofi", "Lena", "Mateo",
         "Nina", "Omar", "Petra", "Quinn", "Rosa", "Sven", "Tara", "Umar", "Vera", "Wim", "Xena", "Yusuf", "Zoe",
         "Anton", "Bea", "Carlos", "Dita", "Erik", "Fiona", "Gil", "Hugo", "Iris", "Jonas", "Kira", "Liam", "Mila",
         "Noah", "Olga", "Pablo", "Rita", "Sami", "Tomas", "Ulla", "Viktor", "Wanda", "Yara", "Zeno"]
CITIES = ["Paris", "Oslo", "Lima", "Cairo", "Tokyo", "Quito", "Rome", "Dakar", "Hanoi", "Perth", "Bern", "Riga"]
TRAIN_ROWS, EVAL_ROWS, HELDOUT = 36, 6, 8
RECORD = re.compile(r"[A-Z][a-z]+\|\d+\|[A-Z][a-z]+")
CONFIG = {"epochs": 1, "rank": 8, "learning_rate": 0.002, "effective_batch_size": 1, "apply_chat_template": False}


def record(rng: random.Random, name: str) -> tuple[str, str]:
    age, city = rng.randint(18, 90), rng.choice(CITIES)
    return f"{name} is {age} years old and lives in {city}.\nRecord:", f" {name}|{age}|{city}"


def write_data(folder: Path, served: str) -> dict:
    """A format the base model doesn't follow: a sentence in, `name|age|city` out. Held-out names
    are never seen in training, so matching them means the format was learned, not memorised."""
    rng = random.Random(7)
    names = NAMES[:]
    rng.shuffle(names)
    train_names, heldout_names = names[:TRAIN_ROWS + EVAL_ROWS], names[TRAIN_ROWS + EVAL_ROWS:][:HELDOUT]
    rows = [dict(zip(("prompt", "completion"), record(rng, n)), split="train" if i < TRAIN_ROWS else "evaluation")
            for i, n in enumerate(train_names)]
    heldout = [record(rng, n) for n in heldout_names]
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    batch_rows = [{"custom_id": f"{who}-{i}", "method": "POST", "url": "/v1/completions",
                   "body": {"model": model, "prompt": prompt, "max_tokens": 24, "temperature": 0}}
                  for i, (prompt, _) in enumerate(heldout[:3])
                  for who, model in (("base", ""), ("adapter", "records/1"))]
    (folder / "batch.jsonl").write_text("".join(json.dumps(r) + "\n" for r in batch_rows))
    spec = {"config": {**CONFIG, "base_model": served}, "served": served,
            "heldout_prompts": [p for p, _ in heldout], "heldout_answers": [c.strip() for _, c in heldout]}
    (folder / "spec.json").write_text(json.dumps(spec))
    return spec


@pytest.fixture(scope="module")
def notebook(tmp_path_factory, loaded) -> dict:
    assert CLIENT_PYTHON.exists(), "the clients environment is missing: run `make test` (it creates .venv-clients)"
    work = tmp_path_factory.mktemp("notebook")
    home, adapters = work / "home", work / "adapters"
    home.mkdir()
    adapters.mkdir()
    os.symlink(loaded.model_dir.parent, home / "models", target_is_directory=True)
    spec = write_data(work, loaded.name)
    env = {"LORASERVE_HOME": str(home), "LORASERVE_ADAPTERS_DIR": str(adapters), "LORASERVE_TRAINING_THREADS": "1"}
    server = ServerProcess("--api-key", KEY, "--max-batch-size", "8", env=env).wait_ready()
    try:
        result = subprocess.run([str(CLIENT_PYTHON), str(ROOT / "tests" / "clients" / "notebook.py"), server.url, KEY,
                                 str(work)], capture_output=True, text=True, timeout=900,
                                env={**os.environ, "PREDIBASE_GATEWAY": server.url})
    finally:
        server.stop()
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    printed, _, report_text = result.stdout.partition("@@REPORT@@")
    if (ROOT / ".pytest_cache").is_dir():  # for a post-mortem of a failed run
        (ROOT / ".pytest_cache" / "notebook-report.json").write_text(report_text)
    report = json.loads(report_text)
    return {"report": report, "printed": printed, "spec": spec, "adapters": adapters, "model_dir": loaded.model_dir,
            "tokenizer": loaded.tokenizer}


def exact_matches(outputs: list[str], answers: list[str]) -> float:
    return sum(o.strip() == a for o, a in zip(outputs, answers)) / len(answers)


def in_format(outputs: list[str]) -> float:
    return sum(bool(RECORD.fullmatch(o.strip())) for o in outputs) / len(outputs)


def test_repos_and_datasets_through_the_sdk(notebook):
    train = notebook["report"]["train"]
    assert train["repo_uuid"] == train["repo_again_uuid"]  # exists_ok returns the same repo
    assert train["dataset_status"] == "connected" and train["frame_status"] == "connected"


def test_adapters_create_blocks_until_the_version_serves(notebook):
    train = notebook["report"]["train"]
    assert train["adapter"]["repo"] == "records" and train["adapter"]["tag"] == 1
    saved = notebook["adapters"] / "records" / "1"
    assert (saved / "adapter_model.safetensors").is_file() and Path(train["adapter"]["path"]) == saved.resolve()
    total = TRAIN_ROWS * CONFIG["epochs"] // CONFIG["effective_batch_size"]
    assert f" {total}/{total} steps" in notebook["printed"]  # the SDK's progress bar reached the end


def test_the_fine_tune_learned_the_format(notebook):
    """Greedy exact match on held-out names: the adapter follows the format, the base model doesn't."""
    heldout, answers = notebook["report"]["heldout"], notebook["spec"]["heldout_answers"]
    adapter = [h["adapter"]["text"] for h in heldout]
    base = [h["base"]["text"] for h in heldout]
    print(f"held-out exact match: adapter {exact_matches(adapter, answers):.2f}, "
          f"base {exact_matches(base, answers):.2f}; in the format: adapter {in_format(adapter):.2f}, "
          f"base {in_format(base):.2f}")
    # the format is learned whole; copying a name never seen in training sometimes slips (Umar -> Omar)
    assert in_format(adapter) >= 0.875 and exact_matches(adapter, answers) >= 0.375
    assert in_format(base) <= 0.125 and exact_matches(base, answers) <= 0.125


def test_served_output_equals_peft_on_the_saved_adapter(notebook):
    first = notebook["report"]["heldout"][0]
    prompt_ids = notebook["tokenizer"](first["prompt"])["input_ids"]
    reference = peft_greedy(notebook["model_dir"], notebook["adapters"] / "records" / "1", prompt_ids, 24)
    assert first["adapter"]["token_ids"] == reference[:len(first["adapter"]["token_ids"])]
    assert first["adapter"]["token_ids"] != first["base"]["token_ids"]


def test_a_canceled_job_leaves_no_version(notebook):
    cancel = notebook["report"]["cancel"]
    assert cancel["status_after_create"] in ("queued", "training")
    assert cancel["final"] == "canceled" and cancel["tag"] == 2
    assert cancel["get_error"]["class"] == "FinetuningError"
    assert not (notebook["adapters"] / "records" / "2").exists()


def test_download_upload_archive_delete(notebook):
    trip = notebook["report"]["round_trip"]
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(trip["zip_names"])
    assert trip["copied_output"] == notebook["report"]["heldout"][0]["adapter"]
    assert trip["versions_archived"] == [] and trip["versions_unarchived"] == [trip["uploaded_tag"]]
    assert trip["after_delete"]["class"] is not None and "not found" in trip["after_delete"]["message"]


def test_batch_inference_rows_match_live_generation(notebook):
    batch, heldout = notebook["report"]["batch"], notebook["report"]["heldout"]
    assert batch["final"] == "completed" and batch["listed"]
    by_id = {row["custom_id"]: row for row in batch["rows"]}
    assert len(by_id) == 6
    for i in range(3):
        for who in ("base", "adapter"):
            row = by_id[f"{who}-{i}"]
            assert row["error"] is None and row["response"]["status_code"] == 200
            assert row["response"]["body"]["choices"][0]["text"] == heldout[i][who]["text"]


def test_a_job_for_another_base_model_is_refused(notebook):
    wrong = notebook["report"]["wrong_base"]
    assert wrong["class"] == "RuntimeError" and "400" in wrong["message"] and "serves" in wrong["message"]
