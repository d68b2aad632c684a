"""The OpenAI-compatible API through the official `openai` SDK against a real server."""

import shutil

import httpx
import openai
import pytest

from tests.adapter_factory import SPECS, peft_greedy
from tests.conftest import ADAPTER_PROMPTS

QUESTION = [{"role": "user", "content": ADAPTER_PROMPTS[0]}]


@pytest.fixture(scope="module")
def oa(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def chat_ids(loaded, messages) -> list[int]:
    text = loaded.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return loaded.tokenizer(text, add_special_tokens=False)["input_ids"]


def test_chat_completion_matches_peft_for_base_and_adapter(oa, loaded, adapter_root):
    ids = chat_ids(loaded, QUESTION)
    for model, adapter_dir in (("", None), (f"{SPECS[1].name}/1", adapter_root / SPECS[1].name / "1")):
        r = oa.chat.completions.create(model=model, messages=QUESTION, max_tokens=16, temperature=0)
        expected = peft_greedy(loaded.model_dir, adapter_dir, ids, 16)
        assert r.choices[0].message.content == loaded.tokenizer.decode(expected, skip_special_tokens=True)
        assert r.id.startswith("chatcmpl-") and r.object == "chat.completion" and r.model == model
        assert r.usage.prompt_tokens == len(ids) and r.usage.total_tokens == len(ids) + r.usage.completion_tokens
        assert r.choices[0].finish_reason in ("length", "stop") and r.choices[0].message.role == "assistant"


def test_streaming_chat_assembles_to_the_same_text_with_usage(oa):
    full = oa.chat.completions.create(model="", messages=QUESTION, max_tokens=20, temperature=0)
    stream = oa.chat.completions.create(model="", messages=QUESTION, max_tokens=20, temperature=0, stream=True,
                                        stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == full.choices[0].finish_reason


def test_stop_sequences_are_left_out_of_the_text(oa):
    free = oa.completions.create(model="", prompt="Count: 1, 2, 3,", max_tokens=20, temperature=0).choices[0].text
    stop = free.split(",")[1]  # e.g. " 5": appears mid-text
    r = oa.completions.create(model="", prompt="Count: 1, 2, 3,", max_tokens=20, temperature=0, stop=[stop])
    assert r.choices[0].finish_reason == "stop" and stop not in r.choices[0].text
    assert free.startswith(r.choices[0].text)
    streamed = oa.completions.create(model="", prompt="Count: 1, 2, 3,", max_tokens=20, temperature=0, stop=stop,
                                     stream=True)
    assert "".join(c.choices[0].text for c in streamed) == r.choices[0].text


def test_n_choices_with_a_seed_are_reproducible(oa):
    def ask():
        r = oa.chat.completions.create(model="", messages=QUESTION, max_tokens=12, temperature=0.9, n=3, seed=11)
        return [c.message.content for c in r.choices]

    first = ask()
    assert len(first) == 3 and first == ask() and len(set(first)) > 1


def test_logprobs_in_chat_and_legacy_completions(oa):
    r = oa.chat.completions.create(model="", messages=QUESTION, max_tokens=5, temperature=0, logprobs=True,
                                   top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == 5 and all(len(t.top_logprobs) == 3 and t.top_logprobs[0].token == t.token for t in content)
    assert "".join(t.token for t in content) == r.choices[0].message.content
    legacy = oa.completions.create(model="", prompt="The capital of France is", max_tokens=4, temperature=0,
                                   logprobs=2).choices[0].logprobs
    assert len(legacy.tokens) == 4 and all(len(t) == 2 for t in legacy.top_logprobs) and legacy.text_offset[0] == 0


def test_completions_echo_and_several_prompts(oa):
    r = oa.completions.create(model="", prompt=["Hello", "The sky is"], max_tokens=3, temperature=0, echo=True)
    assert [c.index for c in r.choices] == [0, 1]
    assert r.choices[0].text.startswith("Hello") and r.choices[1].text.startswith("The sky is")
    assert r.id.startswith("cmpl-") and r.object == "text_completion"


def test_logit_bias_bans_a_token(oa, loaded):
    free = oa.completions.create(model="", prompt="The capital of France is", max_tokens=1, temperature=0)
    first = loaded.tokenizer(free.choices[0].text, add_special_tokens=False)["input_ids"][0]
    biased = oa.completions.create(model="", prompt="The capital of France is", max_tokens=1, temperature=0,
                                   logit_bias={str(first): -100})
    assert biased.choices[0].text != free.choices[0].text


def test_models_lists_the_base_and_every_known_adapter(oa, loaded):
    ids = [m.id for m in oa.models.list().data]
    assert ids[0] == loaded.name and f"{SPECS[0].name}/1" in ids
    assert oa.models.retrieve(f"{SPECS[0].name}/1").parent == loaded.name
    with pytest.raises(openai.NotFoundError):
        oa.models.retrieve("no-such/1")


def test_an_adapters_own_chat_template_is_used(oa, loaded, adapter_root):
    target = adapter_root / "templated" / "1"
    if not target.exists():
        shutil.copytree(adapter_root / SPECS[0].name / "1", target)
        (target / "chat_template.jinja").write_text(
            "{% for m in messages %}### {{ m['role'] }}: {{ m['content'] }}\n{% endfor %}### assistant:")
    r = oa.chat.completions.create(model="templated/1", messages=QUESTION, max_tokens=2, temperature=0)
    rendered = f"### user: {ADAPTER_PROMPTS[0]}\n### assistant:"
    assert r.usage.prompt_tokens == len(loaded.tokenizer(rendered, add_special_tokens=False)["input_ids"])


@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({"model": "no-such/1"}, openai.NotFoundError),
        ({"model": "", "temperature": 5}, openai.BadRequestError),
        ({"model": "", "n": 50}, openai.BadRequestError),
        ({"model": "", "tools": [{"type": "function", "function": {"name": "bad name!"}}]}, openai.BadRequestError),
        ({"model": "", "tools": [{"type": "function", "function": {"name": "f"}}],
          "tool_choice": {"type": "function", "function": {"name": "g"}}}, openai.BadRequestError),
        ({"model": "corrupt/1"}, openai.APIStatusError),
    ],
)
def test_errors_use_openais_shape_and_status(oa, kwargs, error):
    with pytest.raises(error) as info:
        oa.chat.completions.create(messages=QUESTION, max_tokens=4, **kwargs)
    body = info.value.body
    assert set(body) == {"message", "type", "param", "code"} and body["message"]


def test_malformed_bodies_are_400_in_openais_shape(server):
    r = httpx.post(server.url + "/v1/chat/completions", json={"model": ""}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"


def test_the_seeds_openai_rest_example_under_the_tenant_path(server):
    r = httpx.post(server.url + "/tenant-id/deployments/v2/llms/default/v1/chat/completions",
                   headers={"Authorization": "Bearer pb_token"}, timeout=120,
                   json={"model": "", "messages": [{"role": "user", "content": "What is machine learning?"}],
                         "max_tokens": 100})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"]
