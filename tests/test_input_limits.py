"""Size limits on what a request may carry (stop strings, JSON schemas, tool definitions), enforced
with clear 4xx errors in both route families' shapes, on the shared real server."""

import json

import pytest

from server.structured.guide import MAX_SCHEMA_BYTES, MAX_SCHEMA_DEPTH
from server.structured.tools import MAX_TOOLS, MAX_TOOLS_BYTES

STOP_LIMIT = 256  # the default max_stop_sequence_length
CHAT = {"model": "", "max_tokens": 2, "messages": [{"role": "user", "content": "Hi"}]}


def native_error(client, parameters: dict) -> dict:
    r = client.post("/generate", json={"inputs": "Hi", "parameters": {"max_new_tokens": 2, **parameters}})
    assert r.status_code == 422, r.text
    body = r.json()
    assert set(body) == {"error", "error_type"} and body["error_type"] == "validation"
    return body


def openai_error(client, route: str, body: dict) -> dict:
    r = client.post(route, json=body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"]
    return error


def nested_schema(depth: int) -> dict:
    schema: dict = {"type": "integer"}
    for _ in range(depth):
        schema = {"type": "array", "items": schema}
    return schema


def big_schema() -> dict:
    keys = MAX_SCHEMA_BYTES // 30 + 1
    return {"type": "object", "properties": {f"field_{i:05d}": {"type": "string"} for i in range(keys)}}


def tool(name: str, parameters: dict | None = None) -> dict:
    return {"type": "function", "function": {"name": name, "parameters": parameters or {"type": "object"}}}


def test_a_stop_sequence_longer_than_the_limit_is_refused_in_both_families(client):
    too_long = "x" * (STOP_LIMIT + 1)
    assert str(STOP_LIMIT) in native_error(client, {"stop": [too_long]})["error"]
    assert str(STOP_LIMIT) in openai_error(client, "/v1/completions",
                                           {"model": "", "prompt": "Hi", "max_tokens": 2, "stop": too_long})["message"]
    chat = openai_error(client, "/v1/chat/completions", {**CHAT, "stop": ["ok", too_long]})
    assert str(STOP_LIMIT) in chat["message"]
    with client.stream("POST", "/generate_stream", json={"inputs": "Hi", "parameters": {"stop": [too_long]}}) as r:
        assert r.status_code == 422 and json.loads(r.read())["error_type"] == "validation"
    at_limit = client.post("/generate", json={"inputs": "Hi", "parameters": {"max_new_tokens": 2,
                                                                             "stop": ["x" * STOP_LIMIT]}})
    assert at_limit.status_code == 200, at_limit.text


@pytest.mark.parametrize("schema, words", [(nested_schema(MAX_SCHEMA_DEPTH + 5), "nested"),
                                           (nested_schema(900), "nested"),
                                           (big_schema(), "larger than")])
def test_oversized_or_too_deep_schemas_are_refused_in_both_families(client, schema, words):
    fmt = {"type": "json_object", "schema": schema}
    assert words in native_error(client, {"response_format": fmt})["error"]
    openai_fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    assert words in openai_error(client, "/v1/chat/completions", {**CHAT, "response_format": openai_fmt})["message"]


def test_tool_definitions_have_count_size_and_depth_limits(client):
    cases = [
        ([tool(f"f{i}") for i in range(MAX_TOOLS + 1)], f"at most {MAX_TOOLS} tools"),
        ([tool("f", {"type": "object", "description": "x" * MAX_TOOLS_BYTES})], "larger than"),
        ([tool("f", {"type": "object", "properties": {"a": nested_schema(MAX_SCHEMA_DEPTH)}})], "nested"),
    ]
    for tools, words in cases:
        error = openai_error(client, "/v1/chat/completions", {**CHAT, "tools": tools, "tool_choice": "required"})
        assert words in error["message"], error
    fine = client.post("/v1/chat/completions", json={**CHAT, "tools": [tool("f")], "tool_choice": "required"})
    assert fine.status_code == 200, fine.text


def test_unparseable_bodies_are_400_json_not_500(client):
    deep = '{"inputs": "hi", "parameters": ' + "[" * 100_000 + "]" * 100_000 + "}"
    r = client.post("/generate", content=deep, headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error_type"] == "bad_request"
    r = client.post("/v1/completions", content=deep, headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
