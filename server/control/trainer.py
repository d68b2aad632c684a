"""SFT LoRA training with peft, run by the job runner as its own process
(`python -m server.control.trainer SPEC_JSON_PATH`) so that a crash or an OOM never takes the server
down and a cancel can simply kill it. It speaks one JSON event per line on stdout (logs go to stderr).

Loss is on completions only (chat rows: on the assistant turns, each through its end-of-turn token).
A plain torch loop: AdamW, linear warmup then linear decay, padded micro-batches with gradient
accumulation up to `effective_batch_size`, deterministic for a given seed. Never imports the engine.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

from server.adapters.weights import MAX_RANK, PROJECTIONS, projection_shapes
from server.control.dataset_files import DatasetFileError, SftExample, sft_examples
from server.model.arch import ArchConfig

log = logging.getLogger("loraserve.trainer")

Emit = Callable[[dict], None]
IGNORE = -100  # label of a token the loss skips
MAX_SEQ_LEN = 2048  # longer rows are cut (their labelled tail may go with it)
MICRO_BATCH_ROWS = 8  # rows per forward pass; effective_batch_size above it accumulates gradients
MICRO_BATCH_TOKENS = 4096  # padded tokens per forward pass (logits are [tokens, vocab] in fp32)

# Predibase's documented defaults (epochs, adapter, learning_rate, rank) and ours for the rest:
# lora_alpha = 2 x rank; no dropout (small datasets learn faster, and runs stay reproducible);
# every attention and MLP projection (FIELD-NOTES: r=8 on all 7 learns a format in ~30 steps);
# 3% warmup; 8 rows a step (the reference's batch); raw prompts unless apply_chat_template (the SDK's default).
DEFAULTS: dict[str, Any] = {
    "task": "sft",
    "adapter": "lora",
    "epochs": 3,
    "train_steps": None,
    "learning_rate": 2e-4,
    "rank": 16,
    "lora_alpha": None,  # None -> 2 x rank
    "lora_dropout": 0.0,
    "target_modules": None,  # None -> every projection of the architecture
    "warmup_ratio": 0.03,
    "effective_batch_size": 8,
    "apply_chat_template": False,
    "enable_early_stopping": False,  # accepted; this trainer runs every step it was asked for
    "lr_scheduler": {"type": "linear"},
    "optimizer": {"type": "adamw"},
}
SCHEDULES = ("linear", "cosine", "constant")
MAX_BATCH = 1024


@dataclass(frozen=True)
class TrainSpec:
    job_id: str
    base_model_dir: str  # HF dir of the served base model
    base_model_name: str  # written as base_model_name_or_path in adapter_config.json
    dataset_path: str
    dataset_file_name: str  # as uploaded; decides the format
    params: dict  # resolve_params() output
    output_dir: str  # staging dir: the finished adapter is written here, complete
    device: str = "cpu"  # "cpu" | "cuda"
    threads: int = 1  # torch.set_num_threads on CPU
    continue_from: Optional[str] = None  # an adapter dir to start from (continueFromVersion)
    seed: int = 42

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "TrainSpec":
        return cls(**json.loads(text))


# ---------------------------------------------------------------- parameters


def resolve_params(params: dict, projections: Sequence[str] = PROJECTIONS) -> dict:
    """The SDK's snake_case params with the defaults filled in, checked. `projections` are the
    module names this architecture family's adapters may target (Phi-3: qkv_proj, gate_up_proj, ...).
    Unknown keys are kept (the SDK echoes them back) but ignored. Raises ValueError on a bad value."""
    out = {**params, **{k: v for k, v in DEFAULTS.items() if params.get(k) is None}}
    if str(out["task"]).lower() != "sft":
        raise ValueError(f"task {out['task']!r} is not supported: this server trains `sft` only")
    if str(out["adapter"]).lower() != "lora":
        raise ValueError(f"adapter type {out['adapter']!r} is not supported: this server trains `lora` only")
    out["task"], out["adapter"] = "sft", "lora"
    out["epochs"] = _int(out, "epochs", 1, 1000)
    if out["train_steps"] is not None:
        out["train_steps"] = _int(out, "train_steps", 1, 1_000_000)
    out["learning_rate"] = _number(out, "learning_rate", 0.0, 1.0, low_open=True)
    out["rank"] = _int(out, "rank", 1, MAX_RANK)
    if out["lora_alpha"] is None:
        out["lora_alpha"] = 2 * out["rank"]
    alpha = _number(out, "lora_alpha", 0, 1e6, low_open=True)
    out["lora_alpha"] = int(alpha) if alpha.is_integer() else alpha
    out["lora_dropout"] = _number(out, "lora_dropout", 0.0, 1.0, high_open=True)
    out["warmup_ratio"] = _number(out, "warmup_ratio", 0.0, 1.0, high_open=True)
    out["effective_batch_size"] = _int(out, "effective_batch_size", 1, MAX_BATCH)
    out["target_modules"] = _target_modules(out["target_modules"], projections)
    for flag in ("apply_chat_template", "enable_early_stopping"):
        if not isinstance(out[flag], bool):
            raise ValueError(f"{flag} must be true or false; got {out[flag]!r}")
    out["lr_scheduler"] = _schedule(out["lr_scheduler"])
    out["optimizer"] = _optimizer(out["optimizer"])
    return out


def _int(params: dict, key: str, low: int, high: int) -> int:
    value = params[key]
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{key} must be a whole number from {low} to {high}; got {value!r}")
    return value


def _number(params: dict, key: str, low: float, high: float, low_open: bool = False, high_open: bool = False) -> float:
    value = params[key]
    ok = _is_number(value) and (value > low if low_open else value >= low)
    ok = ok and (value < high if high_open else value <= high)
    if not ok:
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise ValueError(f"{key} must be a number in {interval}; got {value!r}")
    return float(value)


def _target_modules(value: Any, projections: Sequence[str]) -> list[str]:
    if value is None or value == "all-linear":
        return list(projections)
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not value or not all(isinstance(v, str) for v in value):
        raise ValueError(f"target_modules must be a non-empty list of module names; got {value!r}")
    unknown = [v for v in value if v not in projections]
    if unknown:
        raise ValueError(f"unknown target_modules {unknown}: this model's LoRA targets are {', '.join(projections)}")
    return list(dict.fromkeys(value))


def _schedule(value: Any) -> dict:
    kind = (value or {}).get("type", "linear") if isinstance(value, dict) else value
    if kind not in SCHEDULES:
        raise ValueError(f"lr_scheduler type {kind!r} is not supported: use one of {', '.join(SCHEDULES)}")
    return {**(value if isinstance(value, dict) else {}), "type": kind}


def _optimizer(value: Any) -> dict:
    options = value if isinstance(value, dict) else {}
    kind = options.get("type", "adamw") if isinstance(value, dict) else value
    if not isinstance(kind, str) or "adamw" not in kind.lower():
        raise ValueError(f"optimizer type {kind!r} is not supported: this trainer runs AdamW (any adamw_* name)")
    betas = options.get("betas", (0.9, 0.999))
    if not (isinstance(betas, (list, tuple)) and len(betas) == 2 and all(_is_number(b) and 0 <= b < 1 for b in betas)):
        raise ValueError(f"optimizer betas must be two numbers in [0, 1); got {betas!r}")
    if not (_is_number(options.get("weight_decay", 0.0)) and options.get("weight_decay", 0.0) >= 0):
        raise ValueError(f"optimizer weight_decay must be a number >= 0; got {options.get('weight_decay')!r}")
    return {**options, "type": kind}


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# ---------------------------------------------------------------- rows to tokens


@dataclass(frozen=True)
class EncodedExample:
    input_ids: list[int]
    labels: list[int]  # IGNORE where the model is not taught (prompt, system, user turns)

    @property
    def trained_tokens(self) -> int:
        return sum(label != IGNORE for label in self.labels)


def encode_example(tokenizer: Any, example: SftExample, apply_chat_template: bool) -> EncodedExample:
    """Chat rows always go through the model's chat template; prompt/completion rows only when asked."""
    if example.messages is not None:
        return encode_chat(tokenizer, list(example.messages))
    return encode_completion(tokenizer, example.prompt or "", example.completion or "", apply_chat_template)


def encode_completion(tokenizer: Any, prompt: str, completion: str, apply_chat_template: bool) -> EncodedExample:
    """Prompt tokens (a user turn with the generation prompt, when templated) then completion + EOS.
    Prompt and completion are tokenized apart, as at inference, where the prompt arrives alone."""
    if apply_chat_template:
        text = _render(tokenizer, [{"role": "user", "content": prompt}], add_generation_prompt=True)
        prompt_ids = tokenizer(text, add_special_tokens=False).input_ids
    else:
        prompt_ids = tokenizer(prompt, add_special_tokens=True).input_ids
    answer = tokenizer(completion, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    return EncodedExample(prompt_ids + answer, [IGNORE] * len(prompt_ids) + answer)


def encode_chat(tokenizer: Any, messages: list[dict]) -> EncodedExample:
    """The templated conversation, labelled on each assistant turn's tokens through its end token.
    The spans are found by rendering the conversation prefix by prefix (characters, then tokens by
    their offsets), so a template that injects a default system prompt is handled like any other."""
    text = _render(tokenizer, messages, add_generation_prompt=False)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = encoded.input_ids, encoded.offset_mapping
    labels = [IGNORE] * len(ids)
    for start, end in assistant_spans(tokenizer, messages, text):
        turn = [i for i, (s, _) in enumerate(offsets) if start <= s < end]
        ends = [i for i in turn if ids[i] == tokenizer.eos_token_id]
        for i in turn[: turn.index(ends[-1]) + 1] if ends else turn:  # through the end-of-turn token, not past it
            labels[i] = ids[i]
    return EncodedExample(ids, labels)


def assistant_spans(tokenizer: Any, messages: list[dict], text: str) -> list[tuple[int, int]]:
    """[start, end) character spans of the assistant turns in `text`, the rendered conversation."""
    spans = []
    for i, turn in enumerate(messages):
        if turn["role"] != "assistant":
            continue
        through = _render(tokenizer, messages[: i + 1], add_generation_prompt=False)
        # an opening assistant turn has no prefix to render: its text is found in its own rendering
        opening = _render(tokenizer, messages[:i], add_generation_prompt=True) if i else None
        start = len(opening) if opening is not None and through.startswith(opening) else through.rfind(turn["content"])
        if not text.startswith(through) or start < 0:
            raise DatasetFileError("this model's chat template does not render a conversation prefix by prefix, so "
                                   "the assistant turns can't be located for the loss")
        spans.append((start, len(through)))
    return spans


def _render(tokenizer: Any, messages: list[dict], add_generation_prompt: bool) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise DatasetFileError("the base model has no chat template: chat rows and apply_chat_template need one")
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def encode_rows(tokenizer: Any, examples: list[SftExample], apply_chat_template: bool) -> list[EncodedExample]:
    """Encoded, cut to MAX_SEQ_LEN; a row left with nothing to learn is dropped (logged)."""
    out = []
    for number, example in enumerate(examples, 1):
        encoded = encode_example(tokenizer, example, apply_chat_template)
        if len(encoded.input_ids) > MAX_SEQ_LEN:
            log.warning("row %d: %d tokens, cut to %d", number, len(encoded.input_ids), MAX_SEQ_LEN)
            encoded = EncodedExample(encoded.input_ids[:MAX_SEQ_LEN], encoded.labels[:MAX_SEQ_LEN])
        if encoded.trained_tokens == 0:
            log.warning("row %d: no completion tokens left within %d tokens; skipped", number, MAX_SEQ_LEN)
            continue
        out.append(encoded)
    return out


# ---------------------------------------------------------------- batches and schedule


@dataclass(frozen=True)
class StepPlan:
    total_steps: int
    steps_per_epoch: int
    warmup_steps: int


def plan_steps(train_rows: int, params: dict) -> StepPlan:
    per_epoch = math.ceil(train_rows / params["effective_batch_size"])
    total = params["train_steps"] or params["epochs"] * per_epoch
    return StepPlan(total, per_epoch, math.ceil(params["warmup_ratio"] * total))


def lr_factor(step: int, plan: StepPlan, schedule: str) -> float:
    """Multiplier of the learning rate for optimizer step `step` (0-based): a linear warmup that
    reaches 1 on its last step, then linear (or cosine) decay towards 0, never exactly 0."""
    if step < plan.warmup_steps:
        return (step + 1) / plan.warmup_steps
    if schedule == "constant":
        return 1.0
    progress = (step - plan.warmup_steps) / max(1, plan.total_steps - plan.warmup_steps)
    return 1.0 - progress if schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))


def epoch_batches(rows: int, batch_size: int, generator: torch.Generator) -> list[list[int]]:
    order = torch.randperm(rows, generator=generator).tolist()
    return [order[i : i + batch_size] for i in range(0, rows, batch_size)]


def micro_batches(rows: list[EncodedExample]) -> list[list[EncodedExample]]:
    """Split one optimizer step's rows into forward passes within the row and padded-token budgets."""
    out: list[list[EncodedExample]] = [[]]
    for row in sorted(rows, key=lambda r: len(r.input_ids)):
        grown = out[-1] + [row]
        if out[-1] and (len(grown) > MICRO_BATCH_ROWS or len(grown) * len(row.input_ids) > MICRO_BATCH_TOKENS):
            out.append([row])
        else:
            out[-1] = grown
    return out


def collate(rows: list[EncodedExample], pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Right-padded tensors: input_ids, attention_mask, labels, each [batch, longest]."""
    width = max(len(r.input_ids) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        n = len(row.input_ids)
        ids[i, :n], labels[i, :n], mask[i, :n] = torch.tensor(row.input_ids), torch.tensor(row.labels), 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}


def summed_loss(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum of the next-token cross-entropy over the labelled tokens (the caller divides by their count,
    so accumulation over micro-batches gives exactly the loss of the whole step)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # [b, t, vocab]
    shifted = logits[:, :-1].float().flatten(0, 1)  # [b * (t - 1), vocab]
    return torch.nn.functional.cross_entropy(shifted, batch["labels"][:, 1:].flatten(), ignore_index=IGNORE,
                                             reduction="sum")


def labelled_tokens(rows: list[EncodedExample]) -> int:
    # the first token is never predicted; a label there (never the case for a real row) would not count
    return sum(sum(label != IGNORE for label in r.labels[1:]) for r in rows)


# ---------------------------------------------------------------- the model


def load_peft_model(spec: TrainSpec, params: dict, device: torch.device) -> Any:
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    base = AutoModelForCausalLM.from_pretrained(spec.base_model_dir, dtype=dtype).to(device)
    base.config.use_cache = False
    if spec.continue_from:
        model = PeftModel.from_pretrained(base, spec.continue_from, is_trainable=True)
        config = model.peft_config["default"]
        log.info("continuing from %s: its rank %s, alpha %s and targets %s win over the job's params",
                 spec.continue_from, config.r, config.lora_alpha, sorted(config.target_modules))
        return model
    present = {name.rsplit(".", 1)[-1] for name, _ in base.named_modules()}
    missing = [m for m in params["target_modules"] if m not in present]
    if missing:
        raise ValueError(f"target_modules {missing} are not modules of this base model")
    config = LoraConfig(r=params["rank"], lora_alpha=params["lora_alpha"], lora_dropout=params["lora_dropout"],
                        target_modules=list(params["target_modules"]), bias="none", task_type="CAUSAL_LM")
    return get_peft_model(base, config)


def family_projections(base_model_dir: str) -> list[str]:
    """The modules an adapter of this base model may target (what the server's adapter reader accepts)."""
    config = json.loads((Path(base_model_dir) / "config.json").read_text())
    return list(projection_shapes(ArchConfig.from_hf(config)))


def save_adapter(model: Any, tokenizer: Any, spec: TrainSpec, used_template: bool) -> None:
    """The adapter, complete, in output_dir: weights, config naming the served base model, and the
    chat template it was trained with (the adapter store serves it with the adapter)."""
    out = Path(spec.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    # the served name, not this machine's path, in adapter_config.json and peft's model card
    model.peft_config["default"].base_model_name_or_path = spec.base_model_name
    model.save_pretrained(str(out), safe_serialization=True, save_embedding_layers=False)
    card = out / "README.md"
    if card.is_file():
        card.write_text(card.read_text().replace(str(Path(spec.base_model_dir)), spec.base_model_name))
    source = Path(spec.base_model_dir) / "chat_template.jinja"
    if used_template and source.is_file():
        shutil.copyfile(source, out / "chat_template.jinja")
    elif used_template and getattr(tokenizer, "chat_template", None):
        (out / "chat_template.jinja").write_text(tokenizer.chat_template)


# ---------------------------------------------------------------- the loop


@dataclass
class Run:
    """What the loop needs, built once."""

    model: Any
    optimizer: torch.optim.Optimizer
    plan: StepPlan
    params: dict
    train: list[EncodedExample]
    evaluation: list[EncodedExample]
    pad_id: int
    device: torch.device


def train(spec: TrainSpec, emit: Emit) -> None:
    """Train and save the adapter into spec.output_dir, reporting events through `emit`."""
    from transformers import AutoTokenizer

    params = resolve_params(spec.params, family_projections(spec.base_model_dir))  # idempotent
    device = torch.device(spec.device)
    if device.type == "cpu":
        torch.set_num_threads(max(1, spec.threads))
    torch.manual_seed(spec.seed)
    examples = sft_examples(Path(spec.dataset_path), spec.dataset_file_name)
    tokenizer = AutoTokenizer.from_pretrained(spec.base_model_dir)
    train_rows = encode_rows(tokenizer, [e for e in examples if e.split == "train"], params["apply_chat_template"])
    eval_rows = encode_rows(tokenizer, [e for e in examples if e.split == "evaluation"], params["apply_chat_template"])
    if not train_rows:
        raise DatasetFileError("no training rows with anything to learn (every row is in the evaluation split, "
                               f"or its completion lies past {MAX_SEQ_LEN} tokens)")
    model = load_peft_model(spec, params, device)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    run = Run(model, make_optimizer(model, params), plan_steps(len(train_rows), params), params, train_rows,
              eval_rows, pad_id, device)
    log.info("job %s: %d train / %d evaluation rows, %d steps (%d per epoch), %d trainable parameters on %s",
             spec.job_id, len(train_rows), len(eval_rows), run.plan.total_steps, run.plan.steps_per_epoch,
             sum(p.numel() for p in model.parameters() if p.requires_grad), device)
    emit({"event": "started", "total_steps": run.plan.total_steps, "steps_per_epoch": run.plan.steps_per_epoch,
          "train_rows": len(train_rows), "evaluation_rows": len(eval_rows)})
    train_loop(run, spec.seed, emit)
    used_template = params["apply_chat_template"] or any(e.messages is not None for e in examples)
    save_adapter(model, tokenizer, spec, used_template)
    emit({"event": "done", "adapter_dir": spec.output_dir})


def make_optimizer(model: Any, params: dict) -> torch.optim.Optimizer:
    """torch AdamW on the LoRA weights; betas and weight_decay from the SDK's optimizer dict when given."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    options = params["optimizer"]
    return torch.optim.AdamW(trainable, lr=params["learning_rate"], betas=tuple(options.get("betas", (0.9, 0.999))),
                             weight_decay=options.get("weight_decay", 0.0))


def train_loop(run: Run, seed: int, emit: Emit) -> None:
    """Epochs of shuffled steps until total_steps; a checkpoint event at each epoch's end (and at the
    last step when train_steps stops mid-epoch)."""
    generator = torch.Generator().manual_seed(seed)
    plan, step, checkpoint, losses = run.plan, 0, 0, []
    started = time.monotonic()
    while step < plan.total_steps:
        batches = epoch_batches(len(run.train), run.params["effective_batch_size"], generator)
        for indices in batches[: plan.total_steps - step]:
            lr = run.params["learning_rate"] * lr_factor(step, plan, run.params["lr_scheduler"]["type"])
            loss = optimizer_step(run, [run.train[i] for i in indices], lr)
            step, losses = step + 1, losses + [loss]
            emit({"event": "progress", "step": step, "total_steps": plan.total_steps,
                  "steps_per_epoch": plan.steps_per_epoch, "epoch": round(step / plan.steps_per_epoch, 4),
                  "loss": loss, "learning_rate": lr})
        checkpoint += 1
        emit({"event": "checkpoint", "checkpoint": checkpoint, "step": step,
              "epoch": round(step / plan.steps_per_epoch, 4), "train_loss": sum(losses) / len(losses),
              "validation_loss": evaluate(run), "learning_rate": lr})
        losses = []
    log.info("%d steps in %.1f s (%.3f steps/s)", step, time.monotonic() - started,
             step / max(1e-9, time.monotonic() - started))


def optimizer_step(run: Run, rows: list[EncodedExample], lr: float) -> float:
    """One optimizer step over `rows` (accumulated over micro-batches); returns the mean token loss."""
    run.model.train()
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    tokens, total = labelled_tokens(rows), 0.0
    for micro in micro_batches(rows):
        loss = summed_loss(run.model, collate(micro, run.pad_id, run.device)) / tokens
        loss.backward()
        total += loss.item()
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    return total


def evaluate(run: Run) -> Optional[float]:
    """Mean token loss over the evaluation split, or None without one."""
    if not run.evaluation:
        return None
    run.model.eval()
    total, tokens = 0.0, labelled_tokens(run.evaluation)
    with torch.no_grad():
        for micro in micro_batches(run.evaluation):
            total += summed_loss(run.model, collate(micro, run.pad_id, run.device)).item()
    return total / tokens


# ---------------------------------------------------------------- the child process


def error_message(exc: BaseException) -> str:
    """One line a user can act on."""
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)) or "can't allocate memory" in str(exc):
        return (f"out of memory while training ({type(exc).__name__}): lower effective_batch_size or rank, "
                "or shorten the rows")
    if isinstance(exc, (DatasetFileError, ValueError)):
        return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    first = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def main(argv: list[str]) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the thread budget is spec.threads
    # The event stream owns the real stdout; anything else printed (a library's print) goes to stderr.
    events = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s trainer %(levelname)s %(message)s")

    def emit(event: dict) -> None:
        events.write(json.dumps(event) + "\n")
        events.flush()

    try:
        if len(argv) != 1:
            raise ValueError("usage: python -m server.control.trainer SPEC_JSON_PATH")
        train(TrainSpec.from_json(Path(argv[0]).read_text()), emit)
    except BaseException as exc:  # the parent reads the event; KeyboardInterrupt/SystemExit included
        log.exception("training failed")
        emit({"event": "error", "message": error_message(exc)})
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
