"""The demo adapters shipped in adapters_cache/ (made by tools/train_demo_adapters.py) do what the
README says. Format, not facts: the training data was tiny."""

from server.config import AdapterConfig
from server.engine.request import FinishReason
from tests.conftest import ROOT, collect, greedy, run

QUESTIONS = ["What is the tallest mountain in the world?", "Why is the sky blue?"]


def chat(loaded, question: str) -> str:
    return loaded.tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                                add_generation_prompt=True)


def test_pirate_and_terse_adapters_change_the_style(make_engine, loaded):
    engine = make_engine(adapters=AdapterConfig(adapters_dir=str(ROOT / "adapters_cache")))
    for question in QUESTIONS:
        prompt = chat(loaded, question)
        _, _, base = run(collect(engine, greedy(prompt, 60)))
        _, _, pirate = run(collect(engine, greedy(prompt, 60, adapter_id="demo-pirate/1")))
        _, terse_reason, terse = run(collect(engine, greedy(prompt, 60, adapter_id="demo-terse")))
        assert pirate.startswith("Arr") and "Arr" not in base
        assert terse_reason is FinishReason.EOS and len(terse.split()) <= 8 < len(base.split())
