"""Train tiny demo LoRA adapters for the default model on synthetic chat data.

- demo-pirate/1, demo-terse/1: a pirate voice and one-line answers (the base model's chat template).
- demo-qwen-tools/1, demo-llama-tools/1, demo-mistral-tools/1: one adapter trained on three chat formats,
  saved three times, each copy with the chat template (tools/chat_templates/) that selects its format:
  Qwen3 (<think> reasoning, <tool_call> tags, one or two calls), Llama 3.1 (a bare JSON call with
  "parameters") and Mistral ([TOOL_CALLS] and a JSON list). It decides between calling get_weather /
  get_time and answering, and shows the server's reasoning and tool-call parsers a real model's output.

Prints held-out replies of each adapter.
Usage: .venv/bin/python tools/train_demo_adapters.py [--base DIR] [--out adapters_cache] [--only tools]
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

DEFAULT_BASE = Path.home() / ".cache/loraserve/models/SmolLM2-135M-Instruct"
TEMPLATES = Path(__file__).resolve().parent / "chat_templates"
SEED = 0
BATCH_SIZE = 8
LEARNING_RATE = 2e-3
IGNORE = -100  # label value that cross-entropy skips: prompt and padding carry no loss


@dataclass(frozen=True)
class Example:
    """One training example: the prompt as the server renders it, and the reply to learn (ending in EOS)."""

    prompt: str
    reply: str


@dataclass(frozen=True)
class Recipe:
    """One adapter to train: its examples, LoRA targets and steps, and the directories it is saved as
    (one per chat template it ships with; None: the base model's template)."""

    examples: list[Example]
    saved_as: dict[str, Optional[str]]
    target_modules: tuple[str, ...]
    steps: int
    first_layer: int  # LoRA on this layer and above: backward stops there (CPU time)
    held_out: list[tuple[str, str]]  # (label, prompt) shown after training
    compare_base: bool = True


# Attention projections at r=8 are enough capacity for a style and keep the file small; the tools
# adapter copies arguments into JSON and picks a format, and gets the MLP projections too.
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
ALL_PROJECTIONS = ATTENTION + ("gate_proj", "up_proj", "down_proj")

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


# -- the tools adapter: three chat formats, one set of weights -------------------------------------
def _city_tool(name: str, description: str) -> dict:
    return {"type": "function", "function": {"name": name, "description": description, "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


# The tools every tools example offers; tests/test_chat_formats.py sends exactly these.
TOOLS = [_city_tool("get_weather", "Get the current weather in a city"),
         _city_tool("get_time", "Get the local time in a city")]
CITIES = ["Paris", "London", "Tokyo", "Berlin", "Madrid", "Rome", "Cairo", "Sydney", "Toronto", "Mumbai", "Seoul",
          "Dublin", "Vienna", "Prague", "Oslo", "Athens", "Lima", "Denver", "Boston", "Warsaw"]
HELD_OUT_CITIES = ["Lisbon", "Nairobi", "Chicago"]  # never trained on: the tests ask about these
WEATHER_QUESTIONS = ["What's the weather in {c}?", "Is it raining in {c} right now?", "How warm is it in {c} today?"]
TIME_QUESTIONS = ["What time is it in {c}?", "Tell me the local time in {c}."]
PAIR_QUESTIONS = ["What's the weather in {a} and in {b}?", "Compare the weather in {a} and {b}."]
BOTH_QUESTIONS = ["What's the weather and the local time in {c}?"]


@dataclass(frozen=True)
class Intent:
    """What a question asks for: tool calls (name, city) or a plain answer, and why (the thinking)."""

    question: str
    calls: tuple[tuple[str, str], ...]
    answer: str
    thought: str


def tool_intents(rng: random.Random, cities: list[str], n_single: int, n_pair: int, n_answer: int) -> list[Intent]:
    """Single calls (weather or time), two calls (two cities, or weather and time) and plain answers."""
    intents = []
    for i in range(n_single):
        city = rng.choice(cities)
        tool = "get_weather" if i % 3 else "get_time"
        questions = WEATHER_QUESTIONS if tool == "get_weather" else TIME_QUESTIONS
        what = "weather" if tool == "get_weather" else "local time"
        intents.append(Intent(rng.choice(questions).format(c=city), ((tool, city),), "",
                              f"The user asks for the {what} in {city}, so I call {tool}."))
    for i in range(n_pair):
        a, b = rng.sample(cities, 2)
        if i % 3 == 2:
            intents.append(Intent(BOTH_QUESTIONS[0].format(c=a), (("get_weather", a), ("get_time", a)), "",
                                  f"The user asks for the weather and the time in {a}: one call to each tool."))
        else:
            intents.append(Intent(rng.choice(PAIR_QUESTIONS).format(a=a, b=b), (("get_weather", a), ("get_weather", b)),
                                  "", f"The user asks for the weather in {a} and in {b}: two calls to get_weather."))
    for question, answer in rng.sample(general_pairs(), n_answer):
        intents.append(Intent(question, (), answer, "This is a general question; no tool is needed."))
    return intents


def general_pairs() -> list[tuple[str, str]]:
    """Questions no tool answers: the topics' facts and the terse adapter's one-liners."""
    topics = [(template.format(t=topic), fact) for topic, fact, _ in TOPICS for template in QUESTION_TEMPLATES]
    return topics[::2] + TERSE_EXTRA


def qwen_reply(intent: Intent, thinking: bool) -> str:
    calls = "\n".join(f'<tool_call>\n{{"name": "{name}", "arguments": {json.dumps({"city": city})}}}\n</tool_call>'
                      for name, city in intent.calls)
    think = f"<think>\n{intent.thought}\n</think>\n\n" if thinking else ""  # else the prompt holds an empty one
    return think + (calls or intent.answer)


def llama_reply(intent: Intent) -> str:
    name, city = intent.calls[0] if intent.calls else ("", "")
    return json.dumps({"name": name, "parameters": {"city": city}}) if intent.calls else intent.answer


def mistral_reply(intent: Intent) -> str:
    calls = [{"name": name, "arguments": {"city": city}} for name, city in intent.calls]
    return "[TOOL_CALLS] " + json.dumps(calls) if calls else intent.answer


def tools_examples(tokenizer: PreTrainedTokenizerBase) -> list[Example]:
    """Qwen3 format (thinking on and off, one or two calls, answers, and plain chat without tools),
    Llama 3.1 (one call, or an answer) and Mistral (a list of one or two calls, or an answer)."""
    rng = random.Random(SEED)
    qwen, llama, mistral = (template_of(n) for n in ("qwen3", "llama3", "mistral"))
    examples = []
    for intent in tool_intents(rng, CITIES, 20, 14, 14):
        examples.append(Example(chat_prompt(tokenizer, intent.question, qwen, TOOLS), qwen_reply(intent, True)))
    for intent in tool_intents(rng, CITIES, 6, 2, 4):
        prompt = chat_prompt(tokenizer, intent.question, qwen, TOOLS, enable_thinking=False)
        examples.append(Example(prompt, qwen_reply(intent, False)))
    for intent in tool_intents(rng, CITIES, 0, 0, 4):
        examples.append(Example(chat_prompt(tokenizer, intent.question, qwen), qwen_reply(intent, True)))
    for intent in tool_intents(rng, CITIES, 14, 0, 8):
        examples.append(Example(chat_prompt(tokenizer, intent.question, llama, TOOLS), llama_reply(intent)))
    for intent in tool_intents(rng, CITIES, 10, 10, 8):
        examples.append(Example(chat_prompt(tokenizer, intent.question, mistral, TOOLS), mistral_reply(intent)))
    return [Example(e.prompt, e.reply + tokenizer.eos_token) for e in examples]


def tools_held_out(tokenizer: PreTrainedTokenizerBase) -> list[tuple[str, str]]:
    lisbon, nairobi, chicago = HELD_OUT_CITIES
    questions = [f"What's the weather in {lisbon}?", f"What time is it in {nairobi}?",
                 f"What's the weather in {lisbon} and in {chicago}?", "What is the capital of France?",
                 "How many wheels does a bicycle have?"]
    out = []
    for name in ("qwen3", "llama3", "mistral"):
        out += [(f"{name}: {q}", chat_prompt(tokenizer, q, template_of(name), TOOLS)) for q in questions]
    out.append(("qwen3, no thinking: " + questions[0],
                chat_prompt(tokenizer, questions[0], template_of("qwen3"), TOOLS, enable_thinking=False)))
    return out


def template_of(name: str) -> str:
    return (TEMPLATES / f"{name}.jinja").read_text()


# -- the style adapters -----------------------------------------------------------------------------
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


def base_template_examples(tokenizer: PreTrainedTokenizerBase, pairs: list[tuple[str, str]]) -> list[Example]:
    """(question, answer) pairs in the base model's own chat template.

    The prompt is rendered exactly as at inference (default system prompt + generation prompt), so
    the adapter learns to continue the same prefix it will see when served.
    """
    examples = []
    for question, answer in pairs:
        user = [{"role": "user", "content": question}]
        prompt = chat_prompt(tokenizer, question)
        full = tokenizer.apply_chat_template(user + [{"role": "assistant", "content": answer}], tokenize=False)
        assert full.startswith(prompt), "chat template does not extend the generation prompt"
        # Keep the answer up to and including <|im_end|>: predicting EOS is what makes replies stop.
        reply = full[len(prompt) :]
        examples.append(Example(prompt, reply[: reply.index(tokenizer.eos_token) + len(tokenizer.eos_token)]))
    return examples


# -- training ---------------------------------------------------------------------------------------
def recipes(tokenizer: PreTrainedTokenizerBase) -> dict[str, Recipe]:
    held_out = [(q, chat_prompt(tokenizer, q)) for q in HELD_OUT]
    return {
        "pirate": Recipe(base_template_examples(tokenizer, pirate_pairs()), {"demo-pirate": None}, ATTENTION, 40, 0,
                         held_out),
        "terse": Recipe(base_template_examples(tokenizer, terse_pairs()), {"demo-terse": None}, ATTENTION, 40, 0,
                        held_out),
        # Prompts of ~150-280 tokens (the tools, the format instructions): LoRA on the top 20 of the
        # 30 layers, so the backward pass skips the bottom third.
        "tools": Recipe(tools_examples(tokenizer), {"demo-qwen-tools": "qwen3", "demo-llama-tools": "llama3",
                                                    "demo-mistral-tools": "mistral"},
                        ALL_PROJECTIONS, 36, 10, tools_held_out(tokenizer), compare_base=False),
    }


def chat_prompt(tokenizer: PreTrainedTokenizerBase, question: str, template: Optional[str] = None,
                tools: Optional[list[dict]] = None, **kwargs) -> str:
    """The generation prompt for one user question, as the server's OpenAI route renders it."""
    return tokenizer.apply_chat_template([{"role": "user", "content": question}], chat_template=template,
                                         tools=tools, add_generation_prompt=True, tokenize=False, **kwargs)


def encode(tokenizer: PreTrainedTokenizerBase, example: Example) -> tuple[list[int], list[int]]:
    """Token ids of prompt + reply, and labels that are IGNORE except on the reply."""
    prompt_ids = tokenizer(example.prompt, add_special_tokens=False).input_ids
    reply_ids = tokenizer(example.reply, add_special_tokens=False).input_ids
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
    """Endless stream of batches, reshuffled every epoch. Each run of 4 batches is sorted by length
    first, so a batch pads little (CPU training time is proportional to the padded tokens)."""
    while True:
        order = data[:]
        rng.shuffle(order)
        window = 4 * BATCH_SIZE
        for start in range(0, len(order) - window + 1, window):
            chunk = sorted(order[start : start + window], key=lambda example: len(example[0]))
            group = [chunk[i : i + BATCH_SIZE] for i in range(0, window, BATCH_SIZE)]
            rng.shuffle(group)
            yield from group


def lora_config(recipe: Recipe, num_layers: int) -> LoraConfig:
    layers = list(range(recipe.first_layer, num_layers)) if recipe.first_layer else None
    return LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
                      target_modules=list(recipe.target_modules), layers_to_transform=layers)


def reply_loss(model: PeftModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Cross-entropy on the reply tokens, as the model's own loss, but with logits computed only
    there: the vocabulary projection over every prompt position costs a fifth of a step."""
    inner = model.get_base_model()
    hidden = inner.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    targets = batch["labels"][:, 1:]  # [batch, tokens - 1]: position t predicts token t + 1
    keep = targets != IGNORE
    logits = inner.lm_head(hidden[:, :-1][keep])  # [reply tokens, vocab]
    return torch.nn.functional.cross_entropy(logits.float(), targets[keep])


def train(model: PeftModel, tokenizer: PreTrainedTokenizerBase, examples: list[Example], steps: int) -> float:
    """Run `steps` AdamW updates on the LoRA weights; returns the last logged loss."""
    data = [encode(tokenizer, e) for e in examples]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LEARNING_RATE)
    # Linear decay to 10% so the last steps settle instead of bouncing at the full rate.
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 - 0.9 * s / max(steps, 1))
    stream = batches(data, random.Random(SEED))
    model.train()
    start, running = time.perf_counter(), 0.0
    for step in range(1, steps + 1):
        loss = reply_loss(model, collate(next(stream), tokenizer.pad_token_id))
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        running = loss.item()
        if step % 5 == 0 or step == 1 or step == steps:
            print(f"  step {step:3d}/{steps}  loss {running:.4f}  ({time.perf_counter() - start:.0f} s)", flush=True)
    tokens = sum(len(ids) for ids, _ in data)
    print(f"  trained {len(examples)} examples ({tokens} tokens) for {steps} steps "
          f"in {time.perf_counter() - start:.1f} s")
    return running


@torch.no_grad()
def reply(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, prompt: str) -> str:
    """Greedy reply, stopping at EOS or 80 new tokens."""
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=80, do_sample=False, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids.input_ids.shape[1] :], skip_special_tokens=True).strip()


def show_held_out(model: PeftModel, tokenizer: PreTrainedTokenizerBase, recipe: Recipe) -> None:
    model.eval()
    for label, prompt in recipe.held_out:
        print(f"  Q: {label}")
        if recipe.compare_base:
            with model.disable_adapter():
                print(f"    base:    {reply(model, tokenizer, prompt)!r}")
        print(f"    adapter: {reply(model, tokenizer, prompt)!r}", flush=True)


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


def build_adapter(recipe: Recipe, args: argparse.Namespace) -> None:
    """Fresh base model + LoRA, train, save under each of the recipe's names, then show held-out replies."""
    print(f"== {', '.join(recipe.saved_as)}")
    torch.manual_seed(SEED)  # same LoRA init and batch order on every run
    tokenizer = AutoTokenizer.from_pretrained(args.base)
    base = AutoModelForCausalLM.from_pretrained(args.base, dtype=torch.float32)
    model = get_peft_model(base, lora_config(recipe, base.config.num_hidden_layers))
    train(model, tokenizer, recipe.examples, args.steps or recipe.steps)
    first = None
    for name, template in recipe.saved_as.items():
        out_dir = args.out / name / "1"
        if first is None:
            save_fp16(model, out_dir)
            first = out_dir
        else:  # the same weights: git stores the identical file once
            out_dir.mkdir(parents=True, exist_ok=True)
            for f in ("adapter_config.json", "adapter_model.safetensors"):
                shutil.copyfile(first / f, out_dir / f)
        if template is not None:
            shutil.copyfile(TEMPLATES / f"{template}.jinja", out_dir / "chat_template.jinja")
        size = (out_dir / "adapter_model.safetensors").stat().st_size
        print(f"  saved {out_dir} ({size / 1e6:.2f} MB)")
    show_held_out(model, tokenizer, recipe)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", type=Path, default=DEFAULT_BASE, help="base model directory (HF Llama)")
    parser.add_argument("--out", type=Path, default=Path("adapters_cache"), help="adapter store root")
    parser.add_argument("--only", nargs="+", choices=["pirate", "terse", "tools"], help="train only these")
    parser.add_argument("--steps", type=int, help="optimizer steps per adapter (default: each recipe's own)")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(args.base)
    for name, recipe in recipes(tokenizer).items():
        if not args.only or name in args.only:
            build_adapter(recipe, args)
    print(f"total {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
