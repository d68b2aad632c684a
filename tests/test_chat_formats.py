"""Chat formats: reasoning (<think>), native tool calls (hermes, llama3_json, mistral), chat_template_kwargs,
and regex / choice / grammar outputs.

The pure parsers get table-driven cases, each fed whole and in small pieces (as a stream would
feed them). Then the real server, with demo adapters trained to write each format
(tools/train_demo_adapters.py: the same weights under three chat templates), is driven through the
openai SDK; regex, choice and grammar outputs are checked with `re` and `lark`, not llguidance.
"""

from __future__ import annotations

import json
import re
import shutil

import lark
import openai
import pytest

from server.config import ConfigError, load_settings
from server.engine.request import TokenInfo
from server.errors import ValidationError
from server.structured.chat_format import ReplyParser, chat_format
from server.structured.guide import Constraint, SchemaError, constraint_of
from server.structured.reasoning import NoReasoning, ThinkTags
from server.structured.tool_parsers import HERMES, JSON, LLAMA3_JSON, MISTRAL, ToolCall, ToolCallParser
from server.structured.tools import parse_tools
from tests.conftest import ROOT


# -- pure parsers ---------------------------------------------------------------------------------
def fed(parser, text: str, size: int) -> list:
    """Everything `parser` returns for `text` fed `size` characters at a time, then finished."""
    out = [parser.feed(text[i : i + size]) for i in range(0, len(text), size)] + [parser.finish()]
    return [piece for part in out for piece in (part if isinstance(part, list) else [part])]


@pytest.mark.parametrize("prompt, reply, reasoning, content", [
    ("", "<think>\nThe user asks.\n</think>\n\nParis.", "The user asks.", "Paris."),
    ("<|im_start|>assistant\n<think>\n", "Hmm, two calls.\n</think>\n\nDone.", "Hmm, two calls.", "Done."),
    ("", "Plain answer.", "", "Plain answer."),
    ("<|im_start|>assistant\n<think>\n\n</think>\n\n", "No thinking.", "", "No thinking."),  # enable_thinking=false
    ("", "  <think>cut off while thin", "cut off while thin", ""),
    ("", "<think></think>Empty thoughts.", "", "Empty thoughts."),
    ("", "<thin", "", "<thin"),  # never became the tag
    ("", "Says <think> mid-answer.", "", "Says <think> mid-answer."),  # only a leading tag opens thinking
    ("", "<think>a < b </thinker> c</think>x", "a < b </thinker> c", "x"),
])
@pytest.mark.parametrize("size", [1, 3, 1000])
def test_think_tags_split_reasoning_from_the_answer(prompt, reply, reasoning, content, size):
    splits = fed(ThinkTags().splitter(prompt), reply, size)
    assert "".join(s.reasoning for s in splits) == reasoning
    assert "".join(s.content for s in splits) == content


def call(name: str, **arguments) -> tuple:
    return (name, arguments)


def pieces(fmt, text: str, size: int, max_calls=None) -> list:
    """Parser output with adjacent text joined and calls as (name, arguments)."""
    out: list = []
    for piece in fed(ToolCallParser(fmt, frozenset({"get_weather", "get_time"}), max_calls), text, size):
        if isinstance(piece, ToolCall):
            out.append((piece.name, json.loads(piece.arguments)))
        elif out and isinstance(out[-1], str):
            out[-1] += piece
        else:
            out.append(piece)
    return out


HERMES_TWO = ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
              '<tool_call>\n{"name": "get_time", "arguments": {"city": "Rome"}}\n</tool_call>')


@pytest.mark.parametrize("fmt, text, expected", [
    (HERMES, HERMES_TWO, [call("get_weather", city="Paris"), call("get_time", city="Rome")]),
    (HERMES, 'Let me look.\n<tool_call>\n{"name": "get_time", "arguments": {"city": "Oslo"}}\n</tool_call>',
     ["Let me look.\n", call("get_time", city="Oslo")]),
    (HERMES, '<tool_call>{"name": "get_time", "arguments": "{\\"city\\": \\"Oslo\\"}"}',  # unclosed; string args
     [call("get_time", city="Oslo")]),
    (HERMES, "<tool_call>\nget_weather(Paris)\n</tool_call> ok", ["<tool_call>\nget_weather(Paris)\n</tool_call> ok"]),
    (HERMES, '<tool_call>\n{"name": "undeclared", "arguments": {}}\n</tool_call>',
     ['<tool_call>\n{"name": "undeclared", "arguments": {}}\n</tool_call>']),
    (HERMES, '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par', [
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par']),  # cut off: content, not lost
    (HERMES, "a < b and <tool_calls> is no tag", ["a < b and <tool_calls> is no tag"]),
    (LLAMA3_JSON, '{"name": "get_weather", "parameters": {"city": "Paris"}}', [call("get_weather", city="Paris")]),
    (LLAMA3_JSON, '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}; '
                  '{"name": "get_time", "parameters": {"city": "Oslo"}}',
     [call("get_weather", city="Paris"), call("get_time", city="Oslo")]),
    (LLAMA3_JSON, "The moon orbits the Earth.", ["The moon orbits the Earth."]),
    (LLAMA3_JSON, '{"answer": 42} is JSON', ['{"answer": 42} is JSON']),
    (MISTRAL, '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}}, '
              '{"name": "get_weather", "arguments": {"city": "Rome"}}]',
     [call("get_weather", city="Paris"), call("get_weather", city="Rome")]),
    (MISTRAL, 'Sure. [TOOL_CALLS][{"name": "get_time", "arguments": {"city": "Oslo"}}]',
     ["Sure. ", call("get_time", city="Oslo")]),
    (MISTRAL, "[1] is a footnote", ["[1] is a footnote"]),
    (JSON, '{"name": "get_weather", "arguments": {"city": "Paris"}}', [call("get_weather", city="Paris")]),
    (JSON, '[{"name": "get_weather", "arguments": {}}, {"name": "get_time", "arguments": {}}]',
     [call("get_weather"), call("get_time")]),
    (JSON, '{"name": "get_weather"}', ['{"name": "get_weather"}']),  # no arguments: not a call
    (JSON, "  Hello there", ["  Hello there"]),
])
@pytest.mark.parametrize("size", [1, 4, 1000])
def test_tool_call_formats_parse_calls_and_keep_everything_else_as_content(fmt, text, expected, size):
    assert pieces(fmt, text, size) == expected


def test_parallel_tool_calls_false_keeps_only_the_first_call():
    assert pieces(HERMES, HERMES_TWO, 1, max_calls=1) == [call("get_weather", city="Paris")]


def test_call_ids_follow_each_family():
    assert re.fullmatch(r"[A-Za-z0-9]{9}", MISTRAL.new_id())  # Mistral's template refuses any other id
    assert re.fullmatch(r"call_[0-9a-f]{24}", HERMES.new_id())


QWEN3 = (ROOT / "tools/chat_templates/qwen3.jinja").read_text()
LLAMA3 = (ROOT / "tools/chat_templates/llama3.jinja").read_text()
MISTRAL_TEMPLATE = (ROOT / "tools/chat_templates/mistral.jinja").read_text()
CHATML = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"


@pytest.mark.parametrize("template, tool_parser, reasoning_parser, tools, reasoning", [
    (QWEN3, "auto", "auto", HERMES, ThinkTags()),
    (LLAMA3, "auto", "auto", LLAMA3_JSON, NoReasoning()),
    (MISTRAL_TEMPLATE, "auto", "auto", MISTRAL, NoReasoning()),
    (CHATML, "auto", "auto", JSON, NoReasoning()),
    (CHATML, "hermes", "think", HERMES, ThinkTags()),  # the configuration overrides the template
    (QWEN3, "json", "none", JSON, NoReasoning()),
])
def test_formats_are_recognised_from_the_template_unless_configured(template, tool_parser, reasoning_parser, tools,
                                                                    reasoning):
    fmt = chat_format(template, tool_parser, reasoning_parser)
    assert fmt.tool_calls == tools and fmt.reasoning == reasoning


@pytest.mark.parametrize("key, value", [("tool_call_parser", "pythonic"), ("reasoning_parser", "deepseek")])
def test_unknown_parsers_are_refused_at_start(key, value):
    with pytest.raises(ConfigError, match=key):
        load_settings(overrides={key: value}, environ={})


def test_a_reply_parser_keeps_its_tags_even_when_the_tokenizer_makes_them_special_tokens():
    from server.api.openai import ReplyReader, chat_message

    plan = parse_tools([{"type": "function", "function": {"name": "get_time"}}], "auto")
    reader = ReplyReader((), ReplyParser.for_reply(chat_format(MISTRAL_TEMPLATE), "", plan, True, False))
    tokens = [TokenInfo(9, "[TOOL_CALLS]", 0.0, True), TokenInfo(10, '[{"name": "get_time", "arguments": {}}]', 0.0,
                                                                  False), TokenInfo(2, "</s>", 0.0, True)]
    message = chat_message([d for t in tokens for d in reader.read(t)] + reader.end(), True)
    assert message["content"] is None and message["tool_calls"][0]["function"] == {"name": "get_time",
                                                                                   "arguments": "{}"}


def test_a_constrained_reply_is_not_read_as_reasoning():
    parser = ReplyParser.for_reply(chat_format(QWEN3), "<think>\n", None, True, constrained=True)
    assert [d.content for d in parser.feed('{"a": 1}') + parser.finish()] == ['{"a": 1}']


@pytest.mark.parametrize("response_format, kind, text", [
    ({"type": "regex", "pattern": r"\d+"}, "regex", r"\d+"),
    ({"type": "regex", "regex": "a|b"}, "regex", "a|b"),
    ({"type": "regex", "value": "x"}, "regex", "x"),  # TGI's grammar parameter shape
    ({"type": "choice", "choices": ["yes", 'say "no"']}, "grammar", 'start: "yes" | "say \\"no\\""'),
    ({"type": "grammar", "grammar": "start: /[a-z]+/"}, "grammar", "start: /[a-z]+/"),
    ({"type": "json_object"}, "json_schema", '{"type": "object"}'),
    ({"type": "text"}, None, None),
    (None, None, None),
])
def test_response_format_variants_become_one_constraint(response_format, kind, text):
    constraint = constraint_of(response_format)
    assert (constraint.kind, constraint.text) == (kind, text) if kind else constraint is None


@pytest.mark.parametrize("response_format, message", [
    ({"type": "regex"}, "regex must be a non-empty string"),
    ({"type": "choice", "choices": []}, "non-empty list"),
    ({"type": "choice", "choices": ["a", 3]}, "non-empty list"),
    ({"type": "choice", "choices": ["a"] * 1025}, "at most 1024 choices"),
    ({"type": "grammar", "grammar": "x" * (64 * 1024 + 1)}, "larger than"),
    ({"type": "yaml"}, "response_format type must be"),
])
def test_bad_response_formats_are_refused_before_compiling(response_format, message):
    with pytest.raises(ValidationError, match=message):
        constraint_of(response_format)


def test_vllm_guided_fields_mean_the_same_as_response_format():
    from server.api.openai import requested_format
    from server.api.openai_schemas import ChatCompletionRequest

    def body(**kw) -> ChatCompletionRequest:
        return ChatCompletionRequest(messages=[{"role": "user", "content": "x"}], **kw)

    assert requested_format(body(guided_regex="a+")) == {"type": "regex", "pattern": "a+"}
    assert requested_format(body(guided_choice=["a", "b"])) == {"type": "choice", "choices": ["a", "b"]}
    assert requested_format(body(structured_outputs={"grammar": "start: \"a\""})) == {
        "type": "grammar", "grammar": 'start: "a"'}
    assert requested_format(body(guided_json='{"type": "integer"}')) == {
        "type": "json_schema", "json_schema": {"schema": {"type": "integer"}}}
    with pytest.raises(ValidationError, match="give one of"):
        requested_format(body(guided_regex="a", response_format={"type": "json_object"}))


# -- the real server, the demo adapters and the openai SDK -----------------------------------------
TOOLS = [{"type": "function", "function": {"name": name, "description": description, "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
    for name, description in (("get_weather", "Get the current weather in a city"),
                              ("get_time", "Get the local time in a city"))]  # as the adapters were trained
WEATHER_LISBON = [{"role": "user", "content": "What's the weather in Lisbon?"}]
TWO_CITIES = [{"role": "user", "content": "What's the weather in Lisbon and in Chicago?"}]
GENERAL = [{"role": "user", "content": "What is the largest planet in our solar system?"}]  # a trained question


@pytest.fixture(scope="module")
def oa(server, adapter_root) -> openai.OpenAI:
    """The SDK on the test server, whose adapter store gets the shipped demo tool adapters (read from
    disk when first asked for)."""
    for name in ("demo-qwen-tools", "demo-llama-tools", "demo-mistral-tools"):
        if not (adapter_root / name).exists():
            shutil.copytree(ROOT / "adapters_cache" / name, adapter_root / name)
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


_replies: dict[str, object] = {}


def ask(oa, model: str, messages: list, **kw):
    """One greedy choice; asked once per module, as greedy decoding gives the same reply every time."""
    key = json.dumps([model, messages, kw], sort_keys=True)
    if key not in _replies:
        _replies[key] = oa.chat.completions.create(model=model, messages=messages, tools=TOOLS, max_tokens=120,
                                                   temperature=0, **kw).choices[0]
    return _replies[key]


def calls_of(message) -> list[tuple[str, dict]]:
    assert all(c.type == "function" for c in message.tool_calls or [])
    return [(c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls or []]


def test_qwen_format_reasons_then_calls_in_tool_call_tags(oa):
    choice = ask(oa, "demo-qwen-tools/1", WEATHER_LISBON)
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert "Lisbon" in choice.message.reasoning_content and "<think>" not in choice.message.reasoning_content
    assert calls_of(choice.message) == [("get_weather", {"city": "Lisbon"})]
    assert choice.message.tool_calls[0].id.startswith("call_")


def test_qwen_format_answers_without_a_call_when_none_is_needed(oa):
    choice = ask(oa, "demo-qwen-tools/1", GENERAL)
    assert choice.finish_reason == "stop" and choice.message.tool_calls is None
    assert choice.message.reasoning_content and "Jupiter" in choice.message.content
    assert "<think>" not in choice.message.content and "</think>" not in choice.message.content


def test_two_calls_in_one_reply_unless_parallel_tool_calls_is_false(oa):
    both = ask(oa, "demo-qwen-tools/1", TWO_CITIES)
    assert calls_of(both.message) == [("get_weather", {"city": "Lisbon"}), ("get_weather", {"city": "Chicago"})]
    assert len({c.id for c in both.message.tool_calls}) == 2
    one = ask(oa, "demo-qwen-tools/1", TWO_CITIES, parallel_tool_calls=False)
    assert calls_of(one.message) == calls_of(both.message)[:1] and one.finish_reason == "tool_calls"


def test_streamed_reasoning_and_calls_assemble_to_the_whole_reply(oa):
    whole = ask(oa, "demo-qwen-tools/1", TWO_CITIES)
    stream = oa.chat.completions.create(model="demo-qwen-tools/1", messages=TWO_CITIES, tools=TOOLS, max_tokens=120,
                                        temperature=0, stream=True)
    reasoning, calls, finish, reasoning_chunks = "", {}, None, 0
    for chunk in stream:
        delta = chunk.choices[0].delta
        if getattr(delta, "reasoning_content", None):
            reasoning += delta.reasoning_content
            reasoning_chunks += 1
        for part in delta.tool_calls or []:
            entry = calls.setdefault(part.index, {"id": None, "name": "", "arguments": ""})
            entry["id"] = part.id or entry["id"]
            entry["name"] += part.function.name or "" if part.function else ""
            entry["arguments"] += part.function.arguments or "" if part.function else ""
        finish = chunk.choices[0].finish_reason or finish
    assert reasoning == whole.message.reasoning_content and reasoning_chunks > 3  # streamed, not held
    assert [(c["name"], json.loads(c["arguments"])) for _, c in sorted(calls.items())] == calls_of(whole.message)
    assert finish == "tool_calls" and all(c["id"].startswith("call_") for c in calls.values())


def test_chat_template_kwargs_reach_the_template(oa, loaded):
    def reply(max_tokens: int, **kw):
        return oa.chat.completions.create(model="demo-qwen-tools/1", messages=GENERAL, tools=TOOLS, temperature=0,
                                          max_tokens=max_tokens, **kw)

    thinking, plain = reply(1), reply(60, extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    # the template closed an empty thinking block in the prompt, so the reply is all answer
    empty_block = len(loaded.tokenizer("<think>\n\n</think>\n\n", add_special_tokens=False)["input_ids"])
    assert plain.usage.prompt_tokens == thinking.usage.prompt_tokens + empty_block
    assert ask(oa, "demo-qwen-tools/1", GENERAL).message.reasoning_content
    message = plain.choices[0].message
    assert getattr(message, "reasoning_content", None) is None and "Jupiter" in message.content
    with pytest.raises(openai.BadRequestError, match="may not set add_generation_prompt"):
        ask(oa, "demo-qwen-tools/1", GENERAL, extra_body={"chat_template_kwargs": {"add_generation_prompt": False}})


def test_include_reasoning_false_leaves_the_reasoning_out(oa):
    choice = ask(oa, "demo-qwen-tools/1", GENERAL, extra_body={"include_reasoning": False})
    assert getattr(choice.message, "reasoning_content", None) is None and choice.message.content


def test_llama_format_calls_with_a_bare_json_object(oa):
    choice = ask(oa, "demo-llama-tools/1", WEATHER_LISBON)
    assert calls_of(choice.message) == [("get_weather", {"city": "Lisbon"})] and choice.finish_reason == "tool_calls"
    bees = [{"role": "user", "content": "Can you explain bees to me?"}]  # a trained question
    answer = ask(oa, "demo-llama-tools/1", bees)
    assert answer.message.content == "Bees make honey." and answer.message.tool_calls is None


def test_mistral_format_calls_from_a_list_and_its_ids_render_in_the_next_turn(oa):
    choice = ask(oa, "demo-mistral-tools/1", TWO_CITIES)
    assert calls_of(choice.message) == [("get_weather", {"city": "Lisbon"}), ("get_weather", {"city": "Chicago"})]
    assert all(re.fullmatch(r"[A-Za-z0-9]{9}", c.id) for c in choice.message.tool_calls)
    follow_up = [*TWO_CITIES, {"role": "assistant", "content": None,
                               "tool_calls": [c.model_dump() for c in choice.message.tool_calls]},
                 *({"role": "tool", "tool_call_id": c.id, "content": '{"sky": "clear"}'}
                   for c in choice.message.tool_calls)]
    r = oa.chat.completions.create(model="demo-mistral-tools/1", messages=follow_up, tools=TOOLS, max_tokens=5,
                                   temperature=0)  # Mistral's template raises on ids that are not 9 characters
    assert r.usage.prompt_tokens > 100


# -- regex, choice and grammar outputs --------------------------------------------------------------
# Recursive in shape (nested sums and products), finite in length, so a reply always ends.
ARITHMETIC = """start: sum
sum: product (("+" | "-") product)?
product: atom ("*" atom)?
atom: NUMBER | "(" inner ")"
inner: NUMBER ("+" NUMBER)?
NUMBER: /[1-9][0-9]?/
"""
PHONE = r"\(\d{3}\) \d{3}-\d{4}"


def chat_text(oa, extra_body: dict, content: str = "Write something.") -> str:
    r = oa.chat.completions.create(model="", messages=[{"role": "user", "content": content}], max_tokens=40,
                                   temperature=0.7, seed=1, extra_body=extra_body)
    assert r.choices[0].finish_reason == "stop"
    return r.choices[0].message.content


@pytest.mark.parametrize("extra_body", [{"response_format": {"type": "regex", "pattern": PHONE}},
                                        {"guided_regex": PHONE}])
def test_a_regex_constrains_the_whole_reply(oa, extra_body):
    assert re.fullmatch(PHONE, chat_text(oa, extra_body, "What is your phone number?"))


@pytest.mark.parametrize("extra_body", [{"response_format": {"type": "choice", "choices": ["positive", "negative"]}},
                                        {"guided_choice": ["positive", "negative"]}])
def test_a_choice_is_one_of_the_strings(oa, extra_body):
    assert chat_text(oa, extra_body, "Is 'I love it' positive or negative?") in ("positive", "negative")


@pytest.mark.parametrize("extra_body", [{"response_format": {"type": "grammar", "grammar": ARITHMETIC}},
                                        {"structured_outputs": {"grammar": ARITHMETIC}}])
def test_a_lark_grammar_output_parses_with_lark(oa, extra_body):
    text = chat_text(oa, extra_body, "Write an arithmetic expression.")
    lark.Lark(ARITHMETIC).parse(text)  # raises if the output is not in the grammar's language


def test_the_native_route_takes_the_same_variants(client):
    prompts = {"regex": ({"type": "regex", "pattern": PHONE}, lambda t: re.fullmatch(PHONE, t)),
               "choice": ({"type": "choice", "choices": ["red", "green", "blue"]}, lambda t: t in ("red", "green",
                                                                                                  "blue")),
               "grammar": ({"type": "grammar", "grammar": 'root ::= "x" [0-9] [0-9]? "y"'},  # GBNF
                           lambda t: re.fullmatch(r"x[0-9]{1,2}y", t))}
    for name, (response_format, ok) in prompts.items():
        r = client.post("/generate", json={"inputs": "Answer: ", "parameters": {
            "max_new_tokens": 30, "response_format": response_format, "details": True}})
        assert r.status_code == 200, r.text
        assert ok(r.json()["generated_text"]) and r.json()["details"]["finish_reason"] == "eos_token", name


@pytest.mark.parametrize("response_format, reason", [
    ({"type": "regex", "pattern": "(unclosed"}, "unclosed group"),
    ({"type": "grammar", "grammar": "start: undefined_rule"}, "undefined_rule"),
    ({"type": "choice", "choices": []}, "non-empty list"),
])
def test_bad_regexes_and_grammars_are_422_native_and_400_openai(client, oa, response_format, reason):
    r = client.post("/generate", json={"inputs": "x", "parameters": {"response_format": response_format}})
    assert r.status_code == 422 and r.json()["error_type"] == "validation" and reason in r.json()["error"]
    with pytest.raises(openai.BadRequestError, match=reason):
        oa.chat.completions.create(model="", messages=[{"role": "user", "content": "x"}], max_tokens=5,
                                   extra_body={"response_format": response_format})


def test_completions_take_guided_fields_too(oa):
    r = oa.completions.create(model="", prompt="The answer is", max_tokens=10, temperature=0,
                              extra_body={"guided_choice": ["yes", "no"]})
    assert r.choices[0].text in ("yes", "no")


def test_compiled_constraints_are_checked_up_front(loaded):
    from server.structured.guide import GuideFactory

    factory = GuideFactory(loaded.tokenizer, loaded.eos_token_ids)
    with pytest.raises(SchemaError, match="unknown name"):
        factory.guide_for(Constraint.grammar("start: foo")).result()
