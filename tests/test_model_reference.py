"""Our Llama implementation against transformers' own, on the real default model."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from server.engine.request import FinishReason
from tests.conftest import collect, greedy, run

PROMPTS = ["What is machine learning?", "The capital of France is", "def fibonacci(n):"]


@pytest.fixture(scope="module")
def reference(loaded):
    return AutoModelForCausalLM.from_pretrained(loaded.model_dir, dtype=torch.float32).eval()


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_tokens_match_transformers_generate(loaded, reference, make_engine, prompt):
    engine = make_engine()
    ids = loaded.tokenizer(prompt)["input_ids"]
    with torch.no_grad():
        expected = reference.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False)[0, len(ids):].tolist()
    tokens, reason, _ = run(collect(engine, greedy(prompt, 24, ignore_eos=True)))
    assert reason is FinishReason.LENGTH
    # transformers stops at EOS; compare up to where it stopped
    assert tokens[: len(expected)] == expected


def test_prefill_logits_match_transformers(loaded, reference):
    from server.engine.kv_cache import KVCache
    from server.model.llama import ForwardBatch

    ids = [loaded.tokenizer(p)["input_ids"] for p in PROMPTS]
    kv = KVCache(loaded.model.config, len(ids), 256, loaded.device, loaded.dtype)
    kv.ensure_capacity(64)
    batch = ForwardBatch(
        input_ids=torch.tensor(sum(ids, [])),
        positions=torch.cat([torch.arange(len(i)) for i in ids]),
        slots=torch.arange(len(ids)),
        query_lens=[len(i) for i in ids],
        context_lens=[len(i) for i in ids],
        is_decode=False,
    )
    with torch.no_grad():
        ours = loaded.model(batch, kv)
        for row, prompt_ids in enumerate(ids):
            theirs = reference(torch.tensor([prompt_ids])).logits[0, -1]
            torch.testing.assert_close(ours[row], theirs, atol=1e-3, rtol=1e-3)
