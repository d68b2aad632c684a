"""Constrained decoding: every output that finishes on its own parses and validates (jsonschema),
through both APIs, greedy and sampled, beside unconstrained and adapter requests in the same batch."""

import datetime
import json
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import List, Literal, Optional

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field, constr

from server.structured.guide import Constraint, GuideFactory
from tests.adapter_factory import SPECS


class Character(BaseModel):  # the seed's first example
    name: constr(max_length=10)
    age: int
    strength: int


class Skill(BaseModel):  # the seed's "complex schema"
    name: str
    level: int = Field(ge=1, le=100)
    description: str


class RichCharacter(BaseModel):
    name: str
    age: int
    skills: List[Skill]
    inventory: List[str]
    stats: dict[str, float]


class Pet(BaseModel):
    kind: Literal["cat", "dog", "parrot"]
    nickname: Optional[str] = None
    vaccinated: bool


SCHEMAS = {
    "character": Character.model_json_schema(),
    "rich_character": RichCharacter.model_json_schema(),
    "pet_enum_optional": Pet.model_json_schema(),
    "event_formats": {"type": "object", "required": ["day", "at", "contact", "id"], "properties": {
        "day": {"type": "string", "format": "date"}, "at": {"type": "string", "format": "date-time"},
        "contact": {"type": "string", "format": "email"}, "id": {"type": "string", "format": "uuid"}}},
    "bounded_numbers": {"type": "object", "required": ["score", "ratio"], "properties": {
        "score": {"type": "integer", "minimum": 0, "maximum": 10},
        "ratio": {"type": "number", "exclusiveMinimum": 0, "maximum": 1}}},
    "array_of_objects": {"type": "object", "required": ["items"], "properties": {"items": {
        "type": "array", "minItems": 1, "maxItems": 3, "items": {"type": "object", "required": ["sku", "qty"],
                                                                   "properties": {"sku": {"type": "string"},
                                                                                  "qty": {"type": "integer"}}}}}},
    "deep_nesting": {"type": "object", "required": ["a"], "properties": {"a": {"type": "object", "required": ["b"],
                     "properties": {"b": {"type": "object", "required": ["c"],
                                          "properties": {"c": {"type": "boolean"}}}}}}},
    "pattern_and_length": {"type": "object", "required": ["code", "tags"], "properties": {
        "code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 2}}},
    "max_properties": {"type": "object", "maxProperties": 2, "additionalProperties": {"type": "integer"}},
    "any_json_object": None,
    "string_enum_root": {"type": "object", "required": ["answer"], "properties": {
        "answer": {"enum": ["yes", "no", "maybe"]}}},
}
PROMPT = "Generate a new character for my awesome game. Strength 1-10. Answer in JSON."


def validate(schema, text: str) -> None:
    value = json.loads(text)
    jsonschema.validate(value, schema or {"type": "object"}, format_checker=jsonschema.FormatChecker())
    if schema is SCHEMAS["event_formats"]:  # formats jsonschema only checks with optional extras
        datetime.datetime.fromisoformat(value["at"].replace("Z", "+00:00"))
        datetime.date.fromisoformat(value["day"])
        uuid.UUID(value["id"])


def native_call(client: httpx.Client, schema, temperature: float, chat_text: str) -> tuple[str, str]:
    params = {"max_new_tokens": 200, "response_format": {"type": "json_object", "schema": schema}, "details": True}
    if temperature:
        params.update(temperature=temperature, seed=3)
    r = client.post("/generate", json={"inputs": chat_text, "parameters": params})
    assert r.status_code == 200, r.text
    return r.json()["generated_text"], r.json()["details"]["finish_reason"]


def openai_call(oa: openai.OpenAI, schema, temperature: float, _chat_text: str) -> tuple[str, str]:
    fmt = ({"type": "json_schema", "json_schema": {"name": "out", "schema": schema, "strict": True}}
           if schema is not None else {"type": "json_object"})
    r = oa.chat.completions.create(model="", messages=[{"role": "user", "content": PROMPT}], max_tokens=200,
                                   temperature=temperature, seed=3, response_format=fmt)
    return r.choices[0].message.content, r.choices[0].finish_reason


def test_every_schema_through_both_apis_validates_beside_other_traffic(client, server, loaded):
    oa = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    chat_text = loaded.tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], tokenize=False,
                                                     add_generation_prompt=True)
    jobs = [(api, name, t) for name in SCHEMAS for api in ("native", "openai") for t in (0.0, 0.8)]
    with ThreadPoolExecutor(8) as pool:
        noise = [pool.submit(client.post, "/generate", json={"inputs": "Tell me a joke.", "parameters": {
            "max_new_tokens": 24, "adapter_id": f"{SPECS[i % 3].name}/1" if i % 2 else None}}) for i in range(6)]
        futures = {job: pool.submit(native_call if job[0] == "native" else openai_call,
                                    client if job[0] == "native" else oa, SCHEMAS[job[1]], job[2], chat_text)
                   for job in jobs}
        results = {job: f.result() for job, f in futures.items()}
        assert all(n.result().status_code == 200 for n in noise)
    finished = {job: text for job, (text, reason) in results.items() if reason in ("eos_token", "stop")}
    for (_api, name, _temperature), text in finished.items():
        validate(SCHEMAS[name], text)  # 100% of outputs that ended by themselves
    # A 135M model sometimes repeats inside an unbounded string or number until max_new_tokens: that
    # ends as `length` with partial text, by design. Most requests must still finish on their own.
    unfinished = sorted(j for j in results if j not in finished)
    print(f"{len(finished)}/{len(jobs)} finished by themselves; ran out of tokens: {unfinished}")
    assert len(finished) >= 0.6 * len(jobs), unfinished
    assert all((api, "character", t) in finished for api in ("native", "openai") for t in (0.0, 0.8))


@pytest.mark.parametrize(
    "schema, good, bad",
    [
        ({"type": "integer", "maximum": 10}, "10", "11"),
        ({"type": "object", "maxProperties": 1, "additionalProperties": {"type": "integer"}}, '{"a": 1}',
         '{"a": 1, "b": 2}'),
        ({"type": "number"}, "1.5e3", "1.5e"),
        ({"type": "string", "format": "date"}, '"2024-02-29"', '"2024-13-01"'),
    ],
)
def test_grammar_edge_cases_the_weaker_engines_got_wrong(loaded, schema, good, bad):
    factory = GuideFactory(loaded.tokenizer, loaded.eos_token_ids)

    def accepts(text: str) -> bool:
        matcher = factory.guide_for(Constraint.json_schema(schema)).result().matcher
        ids = loaded.tokenizer(text, add_special_tokens=False)["input_ids"]
        return matcher.try_consume_tokens(ids) == len(ids) and matcher.is_accepting()

    assert accepts(good) and not accepts(bad)


def test_each_request_gets_its_own_copy_of_a_constraint_compiled_once(loaded):
    """A burst of requests with one schema: compiled once, every guide then a fresh copy (advancing
    one leaves the others, and later ones, at the start)."""
    factory = GuideFactory(loaded.tokenizer, loaded.eos_token_ids)
    constraint = Constraint.json_schema({"type": "object", "properties": {"n": {"type": "integer"}},
                                         "required": ["n"]})
    first, second = (factory.guide_for(constraint).result() for _ in range(2))
    for token in loaded.tokenizer('{"n": 4}', add_special_tokens=False)["input_ids"]:
        first.advance(token)
    third = factory.guide_for(constraint).result()
    assert first.matcher.is_accepting() and not second.matcher.is_accepting() and not third.matcher.is_accepting()
    assert len(factory.compile_seconds) == 1
    bad_start = loaded.tokenizer("x", add_special_tokens=False)["input_ids"]
    assert second.matcher.try_consume_tokens(bad_start) == 0


def test_a_schema_that_cannot_compile_is_422_with_the_reason(client, server):
    broken = {"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}
    r = client.post("/generate", json={"inputs": "x", "parameters": {"response_format": {
        "type": "json_object", "schema": broken}}})
    assert r.status_code == 422 and r.json()["error_type"] == "validation" and "missing" in r.json()["error"]
    o = httpx.post(server.url + "/v1/chat/completions", timeout=60, json={
        "model": "", "messages": [{"role": "user", "content": "x"}],
        "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": broken}}})
    assert o.status_code == 400 and o.json()["error"]["type"] == "invalid_request_error"


def test_running_out_of_tokens_ends_with_length_and_partial_text(client):
    r = client.post("/generate", json={"inputs": PROMPT, "parameters": {
        "max_new_tokens": 5, "details": True, "response_format": {"type": "json_object",
                                                                   "schema": SCHEMAS["rich_character"]}}})
    assert r.json()["details"]["finish_reason"] == "length" and r.json()["generated_text"].startswith("{")


@pytest.mark.parametrize(
    "schema, expected",
    [
        ({"type": "object", "properties": {"a": {"type": "integer"}}},
         {"type": "object", "properties": {"a": {"type": "integer"}}, "additionalProperties": False}),
        ({"type": "object", "properties": {"a": {}}, "additionalProperties": True},
         {"type": "object", "properties": {"a": {}}, "additionalProperties": True}),
        ({"$defs": {"S": {"properties": {"x": {}}}}, "items": [{"properties": {}}]},
         {"$defs": {"S": {"properties": {"x": {}}, "additionalProperties": False}},
          "items": [{"properties": {}, "additionalProperties": False}]}),
        ({"type": "object"}, {"type": "object"}),  # no declared properties: stays open
        ({"properties": {"properties": {"type": "string"}}},  # a property named "properties"
         {"properties": {"properties": {"type": "string"}}, "additionalProperties": False}),
    ],
)
def test_declared_objects_are_closed_unless_the_schema_opens_them(schema, expected):
    from server.structured.guide import close_objects

    assert close_objects(schema) == expected
