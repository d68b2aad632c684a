"""The native API over real HTTP against a real server process."""

import json

import httpx

from tests.conftest import ServerProcess


def sse_events(response: httpx.Response) -> list[dict]:
    return [json.loads(line[5:]) for line in response.iter_lines() if line.startswith("data:")]


def test_health_and_info(client):
    assert client.get("/health").json() == {"status": "ok"}
    info = client.get("/info").json()
    assert info["model_id"] == "SmolLM2-135M-Instruct"
    assert info["model_device_type"] == "cpu" and info["max_batch_size"] == 8


def test_generate_returns_coherent_english_with_details_and_headers(client):
    r = client.post("/generate", json={"inputs": "What is machine learning?",
                                       "parameters": {"max_new_tokens": 40, "details": True}})
    assert r.status_code == 200, r.text
    body = r.json()
    text = body["generated_text"]
    assert "learning" in text.lower() and len(text.split()) >= 20
    details = body["details"]
    assert details["finish_reason"] in ("length", "eos_token") and details["generated_tokens"] == len(details["tokens"])
    assert "".join(t["text"] for t in details["tokens"] if not t["special"]) == text
    assert r.headers["x-generated-tokens"] == str(details["generated_tokens"])
    assert int(r.headers["x-prompt-tokens"]) == details["prompt_tokens"] > 0


def test_generate_stream_sends_token_events_then_final_details(client):
    with client.stream("POST", "/generate_stream",
                       json={"inputs": "Write a story about a robot.",
                             "parameters": {"max_new_tokens": 12, "ignore_eos_token": True}}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r)
    assert len(events) == 12
    assert all(e["generated_text"] is None and e["details"] is None for e in events[:-1])
    last = events[-1]
    assert last["details"]["finish_reason"] == "length" and last["details"]["generated_tokens"] == 12
    assert last["generated_text"] == "".join(e["token"]["text"] for e in events if not e["token"]["special"])


def test_stream_and_non_stream_agree_under_greedy(client):
    payload = {"inputs": "The three primary colors are", "parameters": {"max_new_tokens": 16}}
    text = client.post("/generate", json=payload).json()["generated_text"]
    with client.stream("POST", "/generate_stream", json=payload) as r:
        assert sse_events(r)[-1]["generated_text"] == text


def test_stop_sequence_and_return_full_text(client):
    base = {"inputs": "Count: 1, 2, 3,", "parameters": {"max_new_tokens": 30, "details": True}}
    free = client.post("/generate", json=base).json()["generated_text"]
    stop = free.strip().split()[1]
    stopped = client.post("/generate", json={**base, "parameters": {**base["parameters"], "stop": [stop]}}).json()
    assert stopped["details"]["finish_reason"] == "stop_sequence"
    assert stopped["generated_text"].endswith(stop)
    full = client.post("/generate", json={"inputs": "Count: 1, 2, 3,",
                                          "parameters": {"max_new_tokens": 3, "return_full_text": True}}).json()
    assert full["generated_text"].startswith("Count: 1, 2, 3,")


def test_seeded_sampling_is_reproducible_over_http(client):
    payload = {"inputs": "Once upon a time", "parameters": {"max_new_tokens": 16, "temperature": 0.8,
                                                            "seed": 42, "details": True}}
    a, b = client.post("/generate", json=payload).json(), client.post("/generate", json=payload).json()
    assert a["generated_text"] == b["generated_text"] and a["details"]["seed"] == 42


def test_errors_are_json_in_the_native_shape(client):
    cases = [
        ({"content": b"{not json", "headers": {"content-type": "application/json"}}, 422),
        ({"json": {"parameters": {}}}, 422),  # no inputs
        ({"json": {"inputs": "hi", "parameters": {"max_new_tokens": 0}}}, 422),
        ({"json": {"inputs": "hi", "parameters": {"temperature": -1}}}, 422),
        ({"json": {"inputs": "hi", "parameters": {"top_p": 1.5}}}, 422),
        ({"json": {"inputs": "hi", "parameters": {"stop": ["a", "b", "c", "d", "e"]}}}, 422),
        ({"json": {"inputs": "hi " * 3000, "parameters": {"max_new_tokens": 5}}}, 422),
        ({"json": {"inputs": "hi", "parameters": {"max_new_tokens": 5000}}}, 422),
        ({"json": {"inputs": "hi", "parameters": {"watermark": True}}}, 422),
    ]
    for kwargs, status in cases:
        r = client.post("/generate", **kwargs)
        assert r.status_code == status, (kwargs, r.text)
        body = r.json()
        assert set(body) == {"error", "error_type"} and body["error"], body
    r = client.post("/generate", json={"inputs": "hi " * 3000, "parameters": {"max_new_tokens": 5}})
    assert "tokens" in r.json()["error"] and "1792" in r.json()["error"]
    assert client.get("/no-such-route").json()["error_type"] == "not_found"
    # the server is still fine after all of that
    assert client.post("/generate", json={"inputs": "Hello", "parameters": {"max_new_tokens": 2}}).status_code == 200


def test_second_start_reuses_the_converted_model(server, loaded):
    # the session server already converted the model: a fresh process must be ready in seconds
    import time

    start = time.monotonic()
    second = ServerProcess("--max-batch-size", "2", "--max-concurrent-requests", "4").wait_ready(timeout=60)
    try:
        assert time.monotonic() - start < 60
        r = httpx.post(second.url + "/generate", json={"inputs": "Hi", "parameters": {"max_new_tokens": 3}}, timeout=60)
        assert r.status_code == 200
    finally:
        second.stop()
