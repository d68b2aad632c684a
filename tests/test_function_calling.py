"""Function calling through the openai SDK: forced and named calls are grammar-constrained to a
declared tool with schema-valid arguments; streamed calls assemble; tool results round-trip."""

import json

import jsonschema
import openai
import pytest

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
                                            "parameters": {"type": "object", "required": ["location"],
                                                           "properties": {"location": {"type": "string",
                                                                                       "maxLength": 40},
                                                                          "unit": {"enum": ["c", "f"]}}}}}
TIME = {"type": "function", "function": {"name": "get_time", "description": "Current time in a timezone",
                                         "parameters": {"type": "object", "required": ["tz"],
                                                        "properties": {"tz": {"type": "string", "maxLength": 30}}}}}
ASK = [{"role": "user", "content": "What's the weather like in San Francisco?"}]


@pytest.fixture(scope="module")
def oa(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def check_call(call, tool) -> dict:
    assert call.id.startswith("call_") and call.type == "function" and call.function.name == tool["function"]["name"]
    arguments = json.loads(call.function.arguments)
    jsonschema.validate(arguments, tool["function"]["parameters"])
    return arguments


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_required_tool_choice_returns_a_valid_call(oa, temperature):
    r = oa.chat.completions.create(model="", messages=ASK, tools=[WEATHER, TIME], tool_choice="required",
                                   max_tokens=80, temperature=temperature, seed=4)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    tool = WEATHER if choice.message.tool_calls[0].function.name == "get_weather" else TIME
    check_call(choice.message.tool_calls[0], tool)


def test_a_named_function_is_the_one_called(oa):
    r = oa.chat.completions.create(model="", messages=ASK, tools=[WEATHER, TIME], max_tokens=80, temperature=0,
                                   tool_choice={"type": "function", "function": {"name": "get_time"}})
    check_call(r.choices[0].message.tool_calls[0], TIME)


def test_streamed_tool_call_deltas_assemble_like_the_sdk_expects(oa):
    stream = oa.chat.completions.create(model="", messages=ASK, tools=[WEATHER], tool_choice="required",
                                        max_tokens=80, temperature=0, stream=True)
    name, arguments, call_id, finish = "", "", None, None
    for chunk in stream:
        delta = chunk.choices[0].delta
        for part in delta.tool_calls or []:
            call_id = part.id or call_id
            name += (part.function.name or "") if part.function else ""
            arguments += (part.function.arguments or "") if part.function else ""
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls" and call_id.startswith("call_") and name == "get_weather"
    jsonschema.validate(json.loads(arguments), WEATHER["function"]["parameters"])


def test_tool_results_round_trip_into_the_next_turn(oa):
    first = oa.chat.completions.create(model="", messages=ASK, tools=[WEATHER], tool_choice="required",
                                       max_tokens=80, temperature=0)
    call = first.choices[0].message.tool_calls[0]
    follow_up = [*ASK, {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                 {"role": "tool", "tool_call_id": call.id, "content": '{"temperature_c": 18, "sky": "foggy"}'}]
    r = oa.chat.completions.create(model="", messages=follow_up, tools=[WEATHER], max_tokens=40, temperature=0)
    assert r.usage.prompt_tokens > first.usage.prompt_tokens + 10  # the call and its result are in the prompt
    message = r.choices[0].message
    assert message.content or message.tool_calls


def test_auto_answers_in_text_or_with_a_well_formed_call(oa):
    for question in (ASK, [{"role": "user", "content": "Say hello."}]):
        r = oa.chat.completions.create(model="", messages=question, tools=[WEATHER], tool_choice="auto",
                                       max_tokens=60, temperature=0)
        message = r.choices[0].message
        if message.tool_calls:
            assert r.choices[0].finish_reason == "tool_calls"
            check_call(message.tool_calls[0], WEATHER)
        else:
            assert message.content and r.choices[0].finish_reason in ("stop", "length")


def test_tool_choice_none_never_calls(oa):
    r = oa.chat.completions.create(model="", messages=ASK, tools=[WEATHER], tool_choice="none", max_tokens=20,
                                   temperature=0)
    assert r.choices[0].message.tool_calls is None and r.choices[0].message.content
