"""The seed document's OpenAI examples (../shared/seeds/serving-guide.txt), verbatim but for base_url,
plus the SDK's structured `parse` helper and the over-long-prompt error."""

import openai
import pytest
from openai import OpenAI
from pydantic import BaseModel


@pytest.fixture(scope="module")
def base_url(server) -> str:
    # the seed builds f"https://serving.app.predibase.com/{tenant_id}/deployments/v2/llms/{model_name}/v1"
    tenant_id, model_name = "my-tenant", "default"
    return f"{server.url}/{tenant_id}/deployments/v2/llms/{model_name}/v1"


def test_seed_chat_completion_and_stream_with_an_adapter(base_url, capsys):
    api_token = "<PREDIBASE_API_TOKEN>"
    adapter = "demo-terse/1"  # Ex. "adapter-repo/1" (optional); it answers briefly, the stream has no max_tokens
    client = OpenAI(
        api_key=api_token,
        base_url=base_url
    )
    completion = client.chat.completions.create(
        model=adapter,  # Use empty string "" for base model
        messages=[
            {"role": "user", "content": "What is machine learning?"}
        ],
        max_tokens=100
    )
    print(completion.choices[0].message.content)
    completion_stream = client.chat.completions.create(
        model=adapter,  # Use empty string "" for base model
        messages=[
            {"role": "user", "content": "Write a story about a robot learning to paint."}
        ],
        stream=True
    )
    response = []
    for message in completion_stream:
        token = message.choices[0].delta.content
        response.append(token)
        print(token, end='')
    assert completion.choices[0].message.content and len(response) >= 2
    assert capsys.readouterr().out.strip()


def test_seed_function_calling_example(base_url):
    client = OpenAI(api_key="<PREDIBASE_API_TOKEN>", base_url=base_url)
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "parameters": {
                    "type": "object",
                    "properties": {
                        "location": {"type": "string"}
                    }
                }
            }
        }
    ]
    completion = client.chat.completions.create(
        model="",
        messages=[
            {"role": "user", "content": "What's the weather like in San Francisco?"}
        ],
        max_tokens=100,
        tools=tools
    )
    print("Completion result:", completion.choices[0].message.content)
    message = completion.choices[0].message
    assert message.content or (message.tool_calls and message.tool_calls[0].function.name == "get_weather")


class Character(BaseModel):
    name: str
    age: int
    strength: int


def test_sdk_parse_fills_a_pydantic_model(base_url):
    client = OpenAI(api_key="x", base_url=base_url, max_retries=0)
    completion = client.chat.completions.parse(
        model="", messages=[{"role": "user", "content": "Generate a new character for my awesome game."}],
        response_format=Character, max_tokens=80, temperature=0)
    parsed = completion.choices[0].message.parsed
    assert isinstance(parsed, Character)


def test_an_over_long_prompt_is_a_400_in_openais_shape(base_url):
    client = OpenAI(api_key="x", base_url=base_url, max_retries=0)
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="", messages=[{"role": "user", "content": "word " * 3000}])
    assert "tokens" in info.value.body["message"] and info.value.body["type"] == "invalid_request_error"
