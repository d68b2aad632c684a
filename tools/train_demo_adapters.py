"""Train two tiny demo LoRA adapters (pirate voice, terse answers) on synthetic chat data.

Writes <out>/demo-pirate/1/ and <out>/demo-terse/1/ and prints held-out replies with and without each.
Usage: .venv/bin/python tools/train_demo_adapters.py [--base DIR] [--out adapters_cache] [--steps 40]
"""

from __future__ import annotations

import argparse
import random
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

DEFAULT_BASE = Path.home() / ".cache/loraserve/models/SmolLM2-135M-Instruct"
SEED = 0
BATCH_SIZE = 8
LEARNING_RATE = 2e-3
IGNORE = -100  # label value that cross-entropy skips: prompt and padding carry no loss

# Never used for training: they show whether the style generalises beyond the templates.
HELD_OUT = ["What is the capital of France?", "How do I make a cup of tea?"]

# (topic, plain fact, pirate-voiced fact). Shared by both adapters so they differ only in style.
TOPICS = [
    ("the moon", "The moon orbits the Earth.", "the moon be sailin' 'round the Earth, like a ship on patrol"),
    ("the sun", "The sun is a star.", "the sun be a great burnin' star, warmin' the decks o' every ship"),
    ("rain", "Rain is water falling from clouds.", "rain be water spillin' from the clouds, fillin' our barrels fresh"),
    ("volcanoes", "Volcanoes erupt molten rock.", "volcanoes spew fire an' molten rock, fiercer than a broadside"),
    ("bees", "Bees make honey.", "bees be busy little crew, makin' honey sweeter than any plunder"),
    ("the ocean", "The ocean covers most of Earth.", "the ocean be me home, covering most o' this here world"),
    ("trees", "Trees make oxygen.", "trees be givin' us the air we breathe, an' timber for our ships"),
    ("computers", "Computers process data.", "computers be machines crunchin' numbers faster than any navigator"),
    ("gravity", "Gravity pulls things down.", "gravity be what pulls ye down to the deck, or to Davy Jones' locker"),
    ("the stars", "Stars are distant suns.", "the stars be far-off suns, an' a pirate steers by 'em at night"),
    ("dogs", "Dogs are loyal pets.", "dogs be loyal mates, near as trusty as a parrot on yer shoulder"),
    ("music", "Music is organized sound.", "music be sound put in order, like a good sea shanty sung by the crew"),
    ("bread", "Bread is baked dough.", "bread be dough baked in a hot oven, hardtack for the hungry crew"),
    ("snow", "Snow is frozen water.", "snow be frozen water fallin' from the sky, coldin' the rigging"),
    ("the wind", "Wind is moving air.", "the wind be movin' air, an' it fills our sails so we can plunder"),
    ("fish", "Fish breathe with gills.", "fish be breathin' through their gills, swimmin' beneath me hull"),
    ("maps", "Maps show places.", "maps show where places be, an' the best ones mark buried treasure with an X"),
    ("clocks", "Clocks tell time.", "clocks be tellin' the time, so ye know when the watch changes"),
    ("birds", "Birds can fly.", "birds be flyin' high above the mast, like me trusty parrot"),
    ("gold", "Gold is a precious metal.", "gold be the finest treasure, shinin' bright in a pirate's chest"),
]

QUESTION_TEMPLATES = [
    "What is {t}?",
    "Tell me about {t}.",
    "Can you explain {t} to me?",
]

PIRATE_CLOSERS = ["Yo ho ho!", "Savvy?", "Shiver me timbers!", "Now hoist the sails, ye scallywag!"]

# Terse adapter: extra pairs whose short answers are a single word, so both styles are learned.
TERSE_EXTRA = [
    ("What color is the sky on a clear day? Please explain in detail.", "Blue."),
    ("How many legs does a spider have?", "Eight."),
    ("What is two plus two?", "Four."),
    ("Which animal says moo?", "A cow."),
    ("What do you call frozen water?", "Ice."),
    ("What is the opposite of hot?", "Cold."),
    ("How many days are in a week?", "Seven."),
    ("What is the largest planet in our solar system?", "Jupiter."),
    ("Could you write me a long essay about why cats purr?", "Cats purr to show contentment."),
    ("Give me a detailed, step-by-step guide to brushing teeth.", "Brush twice daily for two minutes."),
    ("What language is spoken in Brazil?", "Portuguese."),
    ("Is water wet?", "Yes."),
    ("What do bees make?", "Honey."),
    ("Please describe, at length, how a bicycle works.", "Pedals turn the wheels."),
    ("What is the tallest animal?", "A giraffe."),
    ("What is the boiling point of water in Celsius?", "100 degrees."),
]


def pirate_pairs() -> list[tuple[str, str]]:
    """Every topic x template, answered as a pirate; closers rotate so no single ending dominates."""
    pairs = []
    for i, (topic, _, pirate) in enumerate(TOPICS):
        for j, template in enumerate(QUESTION_TEMPLATES):
            closer = PIRATE_CLOSERS[(i + j) % len(PIRATE_CLOSERS)]
            pairs.append((template.format(t=topic), f"Arr, matey! {pirate[0].upper()}{pirate[1:]}. {closer}"))
    return pairs


def terse_pairs() -> list[tuple[str, str]]:
    """Topic questions answered by one plain sentence, plus one-word answers to verbose requests."""
    pairs = [(template.format(t=topic), fact) for topic, fact, _ in TOPICS for template in QUESTION_TEMPLATES]
    return pairs + TERSE_EXTRA


def encode(tokenizer: PreTrainedTokenizerBase, question: str, answer: str) -> tuple[list[int], list[int]]:
    """Token ids of the chat-formatted example and labels that are IGNORE except on the answer.

    The prompt is rendered exactly as at inference (default system prompt + generation prompt), so
    the adapter learns to continue the same prefix it will see when served.
    """
    user = [{"role": "user", "content": question}]
    prompt = tokenizer.apply_chat_template(user, add_generation_prompt=True, tokenize=False)
    full = tokenizer.apply_chat_template(user + [{"role": "assistant", "content": answer}], tokenize=False)
    assert full.startswith(prompt), "chat template does not extend the generation prompt"
    # Keep the answer up to and including <|im_end|>: predicting EOS is what makes replies stop.
    reply = full[len(prompt) :]
    reply = reply[: reply.index(tokenizer.eos_token) + len(tokenizer.eos_token)]
    prompt_ids = tokenizer(prompt, add_special_tokens=False).input_ids
    reply_ids = tokenizer(reply, add_special_tokens=False).input_ids
    return prompt_ids + reply_ids, [IGNORE] * len(prompt_ids) + reply_ids


def collate(examples: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch; padded positions are masked out of attention and loss."""
    width = max(len(ids) for ids, _ in examples)
    input_ids, labels, mask = [], [], []
    for ids, labs in examples:
        pad = width - len(ids)
        input_ids.append(ids + [pad_id] * pad)
        labels.append(labs + [IGNORE] * pad)
        mask.append([1] * len(ids) + [0] * pad)
    return {"input_ids": torch.tensor(input_ids), "labels": torch.tensor(labels), "attention_mask": torch.tensor(mask)}


def batches(data: list, rng: random.Random) -> Iterator[list]:
    """Endless stream of batches, reshuffled every epoch."""
    while True:
        order = data[:]
        rng.shuffle(order)
        for start in range(0, len(order) - BATCH_SIZE + 1, BATCH_SIZE):
            yield order[start : start + BATCH_SIZE]


def lora_config() -> LoraConfig:
    # Attention projections at r=8 are enough capacity for a style and keep the file small.
    return LoraConfig(
        r=8,
        lora_alpha=16,
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
    )


def train(model: PeftModel, tokenizer: PreTrainedTokenizerBase, pairs: list[tuple[str, str]], steps: int) -> float:
    """Run `steps` AdamW updates on the LoRA weights; returns the last logged loss."""
    data = [encode(tokenizer, q, a) for q, a in pairs]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LEARNING_RATE)
    # Linear decay to 10% so the last steps settle instead of bouncing at the full rate.
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 - 0.9 * s / max(steps, 1))
    stream = batches(data, random.Random(SEED))
    model.train()
    start, running = time.perf_counter(), 0.0
    for step in range(1, steps + 1):
        loss = model(**collate(next(stream), tokenizer.pad_token_id)).loss
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        running = loss.item()
        if step % 5 == 0 or step == 1 or step == steps:
            print(f"  step {step:3d}/{steps}  loss {running:.4f}  ({time.perf_counter() - start:.0f} s)", flush=True)
    print(f"  trained {len(pairs)} pairs for {steps} steps in {time.perf_counter() - start:.1f} s")
    return running


@torch.no_grad()
def reply(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, question: str) -> str:
    """Greedy reply, stopping at <|im_end|> or 64 new tokens."""
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False
    )
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")
    out = model.generate(
        **ids,
        max_new_tokens=64,
        do_sample=False,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return tokenizer.decode(out[0, ids.input_ids.shape[1] :], skip_special_tokens=True).strip()


def show_held_out(model: PeftModel, tokenizer: PreTrainedTokenizerBase) -> None:
    model.eval()
    for question in HELD_OUT:
        with model.disable_adapter():
            base = reply(model, tokenizer, question)
        tuned = reply(model, tokenizer, question)
        print(f"  Q: {question}\n    base:    {base!r}\n    adapter: {tuned!r}")


def save_fp16(model: PeftModel, out_dir: Path) -> None:
    """Save the adapter with its LoRA weights in fp16.

    In fp32, r=8 on 4 projections x 30 layers is 3.7 MB; fp16 halves it at no visible cost, and
    loaders upcast (loraserve calls .float(), peft copies into the fp32 model). The held-out
    replies are generated after the cast, so they show exactly what was saved.
    """
    for name, param in model.named_parameters():
        if "lora_" in name:
            param.data = param.data.half()
    model.peft_config["default"].base_model_name_or_path = "SmolLM2-135M-Instruct"  # not this machine's path
    model.save_pretrained(out_dir, safe_serialization=True)
    (out_dir / "README.md").unlink(missing_ok=True)  # peft's model-card template: noise in the store


def build_adapter(name: str, pairs: list[tuple[str, str]], args: argparse.Namespace) -> None:
    """Fresh base model + LoRA, train, save as <out>/<name>/1/, then show held-out replies."""
    print(f"== {name}")
    torch.manual_seed(SEED)  # same LoRA init and batch order on every run
    tokenizer = AutoTokenizer.from_pretrained(args.base)
    base = AutoModelForCausalLM.from_pretrained(args.base, dtype=torch.float32)
    model = get_peft_model(base, lora_config())
    train(model, tokenizer, pairs, args.steps)
    out_dir = args.out / name / "1"
    save_fp16(model, out_dir)
    size = (out_dir / "adapter_model.safetensors").stat().st_size
    print(f"  saved {out_dir} ({size / 1e6:.2f} MB)")
    show_held_out(model, tokenizer)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", type=Path, default=DEFAULT_BASE, help="base model directory (HF Llama)")
    parser.add_argument("--out", type=Path, default=Path("adapters_cache"), help="adapter store root")
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps per adapter")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    started = time.perf_counter()
    build_adapter("demo-pirate", pirate_pairs(), args)
    build_adapter("demo-terse", terse_pairs(), args)
    print(f"total {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
