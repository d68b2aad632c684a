"""The fine-tuning trainer: label masks against the tokenizer, parameter checks, an adapter that really
learns a format (judged by peft generating with it), and the child process's event protocol."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from server.adapters.weights import PROJECTIONS, AdapterKey, read_adapter
from server.control.dataset_files import SftExample
from server.control.trainer import (
    IGNORE,
    EncodedExample,
    StepPlan,
    TrainSpec,
    encode_example,
    error_message,
    lr_factor,
    micro_batches,
    plan_steps,
    resolve_params,
    train,
)
from server.model.arch import ArchConfig
from server.model.default_model import DEFAULT_MODEL_NAME, default_model_dir

ROOT = Path(__file__).resolve().parent.parent
SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"  # the template's default
END = "<|im_end|>"


@pytest.fixture(scope="module")
def model_dir() -> Path:
    return default_model_dir()


@pytest.fixture(scope="module")
def tokenizer(model_dir: Path):
    return AutoTokenizer.from_pretrained(model_dir)


# ---------------------------------------------------------------- label masks


def chatml(turns: list[tuple[str, str]]) -> list[tuple[str, bool]]:
    """The conversation written out by hand in ChatML as (text, trained) pieces, independent of the
    template: the default system turn first when there is none, the assistant's text and its end trained."""
    if turns[0][0] != "system":
        turns = [("system", SYSTEM)] + turns
    pieces = []
    for role, content in turns:
        trained = role == "assistant"
        pieces += [(f"<|im_start|>{role}\n", False), (content + END, trained), ("\n", False)]
    return pieces


def expected(tokenizer, pieces: list[tuple[str, bool]]) -> tuple[list[int], list[int]]:
    ids, labels = [], []
    for text, trained in pieces:
        piece = tokenizer(text, add_special_tokens=False).input_ids
        ids += piece
        labels += piece if trained else [IGNORE] * len(piece)
    return ids, labels


def test_completion_labels_raw_prompt(tokenizer) -> None:
    got = encode_example(tokenizer, SftExample("train", prompt="Name: zorbak", completion='{"name": "zorbak"}'),
                         apply_chat_template=False)
    answer = tokenizer('{"name": "zorbak"}', add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    prompt = tokenizer("Name: zorbak").input_ids
    assert got.input_ids == prompt + answer
    assert got.labels == [IGNORE] * len(prompt) + answer
    assert tokenizer.decode([t for t in got.labels if t != IGNORE]) == '{"name": "zorbak"}' + END


def test_completion_labels_chat_template(tokenizer) -> None:
    got = encode_example(tokenizer, SftExample("train", prompt="Hi?", completion="Hello."), apply_chat_template=True)
    pieces = chatml([("user", "Hi?")]) + [("<|im_start|>assistant\n", False), ("Hello." + END, True)]
    ids, labels = expected(tokenizer, pieces)
    assert (got.input_ids, got.labels) == (ids, labels)


@pytest.mark.parametrize("turns", [
    [("user", "What is 2+2?"), ("assistant", "4")],  # the template adds its default system turn
    [("system", "Answer in French."), ("user", "Hello"), ("assistant", "Bonjour !"), ("user", "Thanks"),
     ("assistant", "De rien.")],
    [("assistant", "How can I help?"), ("user", "Tell me a joke."), ("assistant", "Knock knock.")],
    [("user", "Weather?"), ("assistant", "Let me check."), ("tool", "sunny, 21 C"), ("assistant", "Sunny, 21 C.")],
])
def test_chat_labels_cover_exactly_the_assistant_turns(tokenizer, turns) -> None:
    messages = tuple({"role": role, "content": content} for role, content in turns)
    for apply in (False, True):  # chat rows always use the template
        got = encode_example(tokenizer, SftExample("train", messages=messages), apply_chat_template=apply)
        assert (got.input_ids, got.labels) == expected(tokenizer, chatml(turns))
    trained = tokenizer.decode([t for t in got.labels if t != IGNORE])
    assert trained == "".join(c + END for role, c in turns if role == "assistant")


# ---------------------------------------------------------------- parameters


def test_resolve_params_defaults() -> None:
    params = resolve_params({"base_model": "smollm2-135m-instruct", "task": "sft", "custom": 1})
    assert params["epochs"] == 3 and params["learning_rate"] == 2e-4 and params["rank"] == 16
    assert params["adapter"] == "lora" and params["lora_alpha"] == 32 and params["lora_dropout"] == 0.0
    assert params["target_modules"] == list(PROJECTIONS) and params["effective_batch_size"] == 8
    assert params["warmup_ratio"] == 0.03 and params["apply_chat_template"] is False
    assert params["train_steps"] is None and params["custom"] == 1  # unknown keys kept
    assert resolve_params(params) == params  # idempotent: the child resolves again


@pytest.mark.parametrize("given, key, value", [
    ({"epochs": 1}, "epochs", 1),
    ({"epochs": 2.0}, "epochs", 2),
    ({"train_steps": 5}, "train_steps", 5),
    ({"rank": 8}, "lora_alpha", 16),
    ({"rank": 8, "lora_alpha": 8}, "lora_alpha", 8),
    ({"lora_alpha": 12.5}, "lora_alpha", 12.5),
    ({"learning_rate": 1e-3}, "learning_rate", 1e-3),
    ({"target_modules": ["v_proj", "q_proj", "q_proj"]}, "target_modules", ["v_proj", "q_proj"]),
    ({"target_modules": "all-linear"}, "target_modules", list(PROJECTIONS)),
    ({"adapter": "LoRA"}, "adapter", "lora"),
    ({"apply_chat_template": True}, "apply_chat_template", True),
    ({"lr_scheduler": {"type": "cosine"}}, "lr_scheduler", {"type": "cosine"}),
    ({"optimizer": {"type": "adamw_torch_fused"}}, "optimizer", {"type": "adamw_torch_fused"}),
    ({"optimizer": {"type": "adamw", "betas": [0.9, 0.95]}}, "optimizer", {"type": "adamw", "betas": [0.9, 0.95]}),
    ({"epochs": None}, "epochs", 3),
])
def test_resolve_params_overrides(given: dict, key: str, value) -> None:
    assert resolve_params(given)[key] == value


@pytest.mark.parametrize("given, says", [
    ({"epochs": -1}, "epochs"),
    ({"epochs": 0}, "epochs"),
    ({"epochs": True}, "epochs"),
    ({"train_steps": 0}, "train_steps"),
    ({"rank": 0}, "rank"),
    ({"rank": 512}, "rank"),
    ({"rank": "8"}, "rank"),
    ({"learning_rate": 0}, "learning_rate"),
    ({"learning_rate": float("nan")}, "learning_rate"),
    ({"lora_dropout": 1.0}, "lora_dropout"),
    ({"warmup_ratio": -0.1}, "warmup_ratio"),
    ({"effective_batch_size": 0}, "effective_batch_size"),
    ({"adapter": "turbo_lora"}, "adapter type"),
    ({"task": "grpo"}, "task"),
    ({"target_modules": ["qkv_proj"]}, "unknown target_modules"),
    ({"target_modules": []}, "target_modules"),
    ({"apply_chat_template": "yes"}, "apply_chat_template"),
    ({"lr_scheduler": {"type": "polynomial"}}, "lr_scheduler"),
    ({"optimizer": {"type": "sgd"}}, "optimizer"),
    ({"optimizer": {"type": "adamw", "betas": [0.9]}}, "betas"),
    ({"optimizer": {"type": "adamw", "weight_decay": -1}}, "weight_decay"),
])
def test_resolve_params_refusals(given: dict, says: str) -> None:
    with pytest.raises(ValueError, match=says):
        resolve_params(given)


def test_resolve_params_per_family() -> None:
    fused = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")  # Phi-3
    assert resolve_params({}, fused)["target_modules"] == list(fused)
    with pytest.raises(ValueError, match="q_proj"):
        resolve_params({"target_modules": ["q_proj"]}, fused)


@pytest.mark.parametrize("rows, params, plan", [
    (40, {"effective_batch_size": 8, "epochs": 3, "train_steps": None, "warmup_ratio": 0.1}, StepPlan(15, 5, 2)),
    (41, {"effective_batch_size": 8, "epochs": 1, "train_steps": None, "warmup_ratio": 0.0}, StepPlan(6, 6, 0)),
    (40, {"effective_batch_size": 8, "epochs": 3, "train_steps": 7, "warmup_ratio": 0.0}, StepPlan(7, 5, 0)),
])
def test_plan_steps(rows: int, params: dict, plan: StepPlan) -> None:
    assert plan_steps(rows, params) == plan


def test_lr_schedule_warms_up_then_decays_without_a_zero_step() -> None:
    plan = StepPlan(total_steps=10, steps_per_epoch=5, warmup_steps=2)
    linear = [lr_factor(s, plan, "linear") for s in range(10)]
    assert linear[:3] == [0.5, 1.0, 1.0] and linear[-1] == pytest.approx(1 / 8) and linear == sorted(linear[:2]) + \
        sorted(linear[2:], reverse=True)
    assert all(lr_factor(s, plan, "constant") == 1.0 for s in range(2, 10))
    assert lr_factor(2, plan, "cosine") == 1.0 and 0 < lr_factor(9, plan, "cosine") < 0.05


def test_micro_batches_respect_the_budgets() -> None:
    rows = [EncodedExample([1] * n, [1] * n) for n in (10, 600, 20, 700, 30, 5, 5, 5, 5, 5, 5, 5)]
    batches = micro_batches(rows)
    assert sorted(len(r.input_ids) for b in batches for r in b) == sorted(len(r.input_ids) for r in rows)
    assert all(len(b) <= 8 and len(b) * max(len(r.input_ids) for r in b) <= 4096 for b in batches)


def test_error_message_names_out_of_memory() -> None:
    assert "out of memory" in error_message(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"))
    assert "out of memory" in error_message(RuntimeError("DefaultCPUAllocator: can't allocate memory: 9 GB"))
    assert error_message(KeyError("x")) == "KeyError: 'x'"


# ---------------------------------------------------------------- a real training run


def name_rows(count: int, seed: int = 7) -> list[str]:
    """Made-up words the model has no facts about: the task is the output format, copying the word."""
    syllables = ["ka", "lo", "mi", "ren", "tu", "zor", "bel", "qui", "dan", "vex", "po", "sha", "nil", "gor", "fe"]
    rng, words = random.Random(seed), set()
    while len(words) < count:
        words.add("".join(rng.choice(syllables) for _ in range(rng.randint(2, 3))))
    ordered = sorted(words)
    rng.shuffle(ordered)
    return ordered


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


TASK_PARAMS = {"epochs": 2, "learning_rate": 2e-3, "rank": 8, "lora_alpha": 16, "effective_batch_size": 4,
               "warmup_ratio": 0.0}
HELD_OUT = 10


@pytest.fixture(scope="module")
def trained(model_dir: Path, tmp_path_factory) -> dict:
    """One adapter for the module: 40 rows of `Name: <word>` -> `{"name": "<word>"}`, 10 held out (the
    evaluation split), rank 8 on every projection, 2 epochs, one CPU thread."""
    root = tmp_path_factory.mktemp("trained")
    words = name_rows(40 + HELD_OUT)
    rows = [{"prompt": f"Name: {w}", "completion": json.dumps({"name": w}),
             "split": "evaluation" if i >= 40 else "train"} for i, w in enumerate(words)]
    dataset = write_jsonl(root / "names.jsonl", rows)
    spec = TrainSpec(job_id="names", base_model_dir=str(model_dir), base_model_name=DEFAULT_MODEL_NAME,
                     dataset_path=str(dataset), dataset_file_name="names.jsonl", params=resolve_params(TASK_PARAMS),
                     output_dir=str(root / "adapter"), threads=1, seed=42)
    events: list[dict] = []
    started = time.monotonic()
    train(spec, events.append)
    seconds = time.monotonic() - started
    steps = [e for e in events if e["event"] == "progress"]
    train_seconds = seconds  # includes the model load and the two validation passes
    print(f"\ntrained {len(steps)} steps in {train_seconds:.1f} s ({len(steps) / train_seconds:.2f} steps/s "
          "at threads=1, batch 4, rank 8 on all projections, model load included)")
    return {"spec": spec, "events": events, "held_out": rows[40:], "dir": Path(spec.output_dir)}


def test_events_in_order_and_loss_goes_down(trained: dict) -> None:
    events = trained["events"]
    assert events[0] == {"event": "started", "total_steps": 20, "steps_per_epoch": 10, "train_rows": 40,
                         "evaluation_rows": HELD_OUT}
    assert [e["event"] for e in events] == ["started"] + (["progress"] * 10 + ["checkpoint"]) * 2 + ["done"]
    progress = [e for e in events if e["event"] == "progress"]
    assert [e["step"] for e in progress] == list(range(1, 21))
    assert progress[0]["learning_rate"] == pytest.approx(2e-3) and progress[-1]["learning_rate"] < 2e-4
    first, last = sum(e["loss"] for e in progress[:3]) / 3, sum(e["loss"] for e in progress[-3:]) / 3
    assert last < first / 5, (first, last)
    checkpoints = [e for e in events if e["event"] == "checkpoint"]
    assert [(c["checkpoint"], c["step"], c["epoch"]) for c in checkpoints] == [(1, 10, 1.0), (2, 20, 2.0)]
    assert all(c["validation_loss"] is not None and c["validation_loss"] < first for c in checkpoints)
    assert checkpoints[1]["train_loss"] < checkpoints[0]["train_loss"]
    assert events[-1] == {"event": "done", "adapter_dir": str(trained["dir"])}


def peft_answers(model_dir: Path, adapter_dir: Path | None, tokenizer, prompts: list[str]) -> list[str]:
    """Greedy answers from transformers + peft (the reference), raw prompts as the adapter was trained on."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir)
    model.eval()
    answers = []
    with torch.no_grad():
        for prompt in prompts:
            ids = tokenizer(prompt, return_tensors="pt").input_ids
            out = model.generate(ids, max_new_tokens=16, do_sample=False, pad_token_id=tokenizer.eos_token_id)
            answers.append(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
    return answers


def test_adapter_learned_the_format_on_held_out_prompts(trained: dict, model_dir: Path, tokenizer) -> None:
    prompts = [row["prompt"] for row in trained["held_out"]]
    wanted = [row["completion"] for row in trained["held_out"]]

    def rates(answers: list[str]) -> tuple[float, float]:
        exact = sum(a == w for a, w in zip(answers, wanted)) / len(wanted)
        shaped = sum(a.startswith('{"name": "') and a.endswith('"}') for a in answers) / len(wanted)
        return exact, shaped

    base = rates(peft_answers(model_dir, None, tokenizer, prompts))
    tuned = rates(peft_answers(model_dir, trained["dir"], tokenizer, prompts))
    print(f"\nheld-out exact match: base {base[0]:.2f}, adapter {tuned[0]:.2f}; "
          f"format: base {base[1]:.2f}, adapter {tuned[1]:.2f}")
    assert base[0] <= 0.1 and base[1] <= 0.1
    assert tuned[0] >= 0.8 and tuned[1] >= 0.9


def test_server_reads_the_adapter(trained: dict, model_dir: Path) -> None:
    arch = ArchConfig.from_hf(json.loads((model_dir / "config.json").read_text()))
    weights = read_adapter(AdapterKey("local", "names"), trained["dir"], arch)
    assert weights.rank == 8 and weights.target_modules == sorted(PROJECTIONS)
    assert len(weights.modules) == arch.num_layers * len(PROJECTIONS)
    assert weights.config["base_model_name_or_path"] == DEFAULT_MODEL_NAME
    assert weights.config["lora_alpha"] == 16 and weights.chat_template is None  # raw prompts: no template
    assert DEFAULT_MODEL_NAME in (trained["dir"] / "README.md").read_text()  # peft's card: no local path
    assert str(model_dir) not in (trained["dir"] / "README.md").read_text()
    assert sorted(p.name for p in trained["dir"].iterdir()) == ["README.md", "adapter_config.json",
                                                                 "adapter_model.safetensors"]


def test_continue_from_starts_at_the_adapter(trained: dict, tmp_path: Path) -> None:
    first = next(e for e in trained["events"] if e["event"] == "progress")
    spec = TrainSpec(**{**trained["spec"].__dict__, "params": resolve_params({**TASK_PARAMS, "rank": 4,
                                                                              "train_steps": 1}),
                        "output_dir": str(tmp_path / "more"), "continue_from": str(trained["dir"])})
    events: list[dict] = []
    train(spec, events.append)
    again = next(e for e in events if e["event"] == "progress")
    assert again["loss"] < first["loss"] / 5, (again["loss"], first["loss"])  # it began from the trained weights
    config = json.loads((tmp_path / "more" / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["base_model_name_or_path"] == DEFAULT_MODEL_NAME  # its rank wins


# ---------------------------------------------------------------- the child process


def run_child(spec: TrainSpec, tmp_path: Path) -> tuple[int, list[dict], str]:
    spec_path = tmp_path / f"{spec.job_id}.json"
    spec_path.write_text(spec.to_json())
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "server.control.trainer", str(spec_path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    return proc.returncode, [json.loads(line) for line in proc.stdout.splitlines()], proc.stderr


def chat_rows() -> list[dict]:
    rows = [{"messages": [{"role": "user", "content": f"Say {w}."}, {"role": "assistant", "content": w}]}
            for w in ("alpha", "beta", "gamma", "delta")]
    return rows + [{"messages": rows[0]["messages"], "split": "evaluation"}]


def test_child_process_emits_the_protocol(model_dir: Path, tmp_path: Path) -> None:
    dataset = write_jsonl(tmp_path / "chat.jsonl", chat_rows())
    spec = TrainSpec(job_id="child", base_model_dir=str(model_dir), base_model_name=DEFAULT_MODEL_NAME,
                     dataset_path=str(dataset), dataset_file_name="chat.jsonl",
                     params=resolve_params({"train_steps": 2, "rank": 4, "effective_batch_size": 2}),
                     output_dir=str(tmp_path / "out"), threads=1)
    code, events, stderr = run_child(spec, tmp_path)
    assert code == 0, stderr[-2000:]
    assert [e["event"] for e in events] == ["started", "progress", "progress", "checkpoint", "done"]
    assert events[0] == {"event": "started", "total_steps": 2, "steps_per_epoch": 2, "train_rows": 4,
                         "evaluation_rows": 1}
    assert events[3]["validation_loss"] is not None and events[3]["step"] == 2
    out = Path(events[-1]["adapter_dir"])
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 4
    assert (out / "chat_template.jinja").read_text() == (model_dir / "chat_template.jinja").read_text()
    same: list[dict] = []  # the same spec in-process: the same losses (seeded, one thread)
    train(TrainSpec(**{**spec.__dict__, "output_dir": str(tmp_path / "again")}), same.append)
    losses = [[e["loss"] for e in run if e["event"] == "progress"] for run in (same, events)]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


@pytest.mark.parametrize("rows, file_name, says", [
    ([{"prompt": "a", "completion": ""}], "bad.jsonl", "row 1: `completion` is empty"),
    ([{"prompt": "a", "completion": "b"}], "bad.parquet", "unsupported dataset file"),
])
def test_child_process_reports_a_bad_dataset(model_dir: Path, tmp_path: Path, rows, file_name, says) -> None:
    dataset = write_jsonl(tmp_path / "rows.jsonl", rows)
    spec = TrainSpec(job_id="bad", base_model_dir=str(model_dir), base_model_name=DEFAULT_MODEL_NAME,
                     dataset_path=str(dataset), dataset_file_name=file_name, params=resolve_params({}),
                     output_dir=str(tmp_path / "out"))
    code, events, _ = run_child(spec, tmp_path)
    assert code == 1 and len(events) == 1
    assert events[0]["event"] == "error" and says in events[0]["message"]
    assert not (tmp_path / "out").exists()


def test_trainer_never_imports_the_engine_or_the_api() -> None:
    code = ("import sys, server.control.trainer; "
            "print([m for m in sys.modules if m.startswith(('server.engine', 'server.api'))])")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                         capture_output=True, text=True, timeout=120, check=True).stdout
    assert out.strip() == "[]"
