"""Native API details a real client relies on: routes, best_of, prefill log-probs, alternatives, errors."""

import json
import math

import httpx
import pytest


def post(client, path, inputs="The capital of France is", **params):
    return client.post(path, json={"inputs": inputs, "parameters": params})


def test_root_route_answers_a_one_element_list_and_streams_when_asked(client):
    r = client.post("/", json={"inputs": "Hello", "parameters": {"max_new_tokens": 4}})
    assert r.status_code == 200 and isinstance(r.json(), list) and len(r.json()) == 1
    plain = post(client, "/generate", "Hello", max_new_tokens=4).json()
    assert r.json()[0]["generated_text"] == plain["generated_text"]
    with client.stream("POST", "/", json={"inputs": "Hello", "stream": True,
                                          "parameters": {"max_new_tokens": 3, "ignore_eos_token": True}}) as s:
        events = [json.loads(line[5:]) for line in s.iter_lines() if line.startswith("data:")]
    assert len(events) == 3 and events[-1]["details"]["finish_reason"] == "length"


def test_deployment_paths_from_the_seeds_work_and_unknown_deployments_404(client):
    base = "/my-tenant/deployments/v2/llms"
    ok = post(client, f"{base}/default/generate", max_new_tokens=3)
    also = post(client, f"{base}/smollm2-135m-instruct/generate", max_new_tokens=3)
    assert ok.status_code == also.status_code == 200
    with client.stream("POST", f"{base}/default/generate_stream",
                       json={"inputs": "Hi", "parameters": {"max_new_tokens": 2}}) as s:
        assert s.status_code == 200
    missing = post(client, f"{base}/qwen3-8b/generate", max_new_tokens=3)
    assert missing.status_code == 404 and missing.json()["error_type"] == "not_found"


def test_decoder_input_details_scores_the_prompt(client, loaded):
    r = post(client, "/generate", max_new_tokens=2, details=True, decoder_input_details=True).json()
    prefill = r["details"]["prefill"]
    prompt_ids = loaded.tokenizer("The capital of France is")["input_ids"]
    assert [t["id"] for t in prefill] == prompt_ids
    assert prefill[0]["logprob"] is None and all(t["logprob"] < 0 for t in prefill[1:])
    # " France" after "The capital of" is far likelier than its unconditional share of the vocabulary
    assert prefill[3]["logprob"] > math.log(1 / 49152) + 5
    refused = post(client, "/generate_stream", max_new_tokens=2, decoder_input_details=True)
    assert refused.status_code == 422 and "streaming" in refused.json()["error"]


def test_return_k_alternatives_lists_the_top_tokens_with_the_chosen_one_first(client):
    r = post(client, "/generate", max_new_tokens=3, details=True, return_k_alternatives=3).json()
    for token in r["details"]["tokens"]:
        alternatives = token["alternative_tokens"]
        assert len(alternatives) == 3 and alternatives[0]["id"] == token["id"]  # greedy picks the top one
        assert alternatives[0]["logprob"] >= alternatives[1]["logprob"] >= alternatives[2]["logprob"]


def test_best_of_returns_the_most_likely_candidate_and_the_others(client):
    r = post(client, "/generate", "Once upon a time", max_new_tokens=8, details=True, best_of=3, do_sample=True,
             seed=5, ignore_eos_token=True).json()
    details = r["details"]
    others = details["best_of_sequences"]
    assert len(others) == 2
    best = sum(t["logprob"] for t in details["tokens"])
    assert all(best >= sum(t["logprob"] for t in o["tokens"]) for o in others)
    assert post(client, "/generate", best_of=2, max_new_tokens=2).status_code == 422  # greedy
    assert post(client, "/generate", best_of=9, do_sample=True, max_new_tokens=2).status_code == 422  # > max
    assert post(client, "/generate_stream", best_of=2, do_sample=True, max_new_tokens=2).status_code == 422


@pytest.mark.parametrize(
    "kwargs, status, error_type",
    [
        ({"content": b'{"inputs": "hi"', "headers": {"content-type": "application/json"}}, 422, "validation"),
        ({"content": b'{"inputs": "hi"}', "headers": {"content-type": "text/plain"}}, 415, "unsupported_media_type"),
        ({"content": b'{"inputs": "' + b"x" * (5 * 1024 * 1024) + b'"}',
          "headers": {"content-type": "application/json"}}, 413, "payload_too_large"),
    ],
)
def test_malformed_wrong_type_and_oversized_bodies_get_json_errors(client, kwargs, status, error_type):
    r = client.post("/generate", **kwargs)
    assert r.status_code == status and r.json()["error_type"] == error_type and r.json()["error"]


def test_an_adapter_error_inside_a_stream_request_is_answered_before_the_stream(client):
    r = client.post("/generate_stream", json={"inputs": "Hi", "parameters": {"adapter_id": "no-such/1"}})
    assert r.status_code == 424 and r.json()["error_type"] == "generation"


def test_headers_report_timing(client):
    r = post(client, "/generate", max_new_tokens=3)
    assert float(r.headers["x-time-to-first-token"]) > 0 and float(r.headers["x-total-time"]) > 0
    assert isinstance(httpx.Headers(r.headers)["x-adapter-id"], str)


def test_the_seeds_rest_example_works_with_only_the_host_changed(client):
    # ../shared/seeds/serving-guide.txt, "REST API": the body and headers exactly as documented
    r = client.post("/my-tenant-id/deployments/v2/llms/default/generate",
                    headers={"Content-Type": "application/json", "Authorization": "Bearer pb_token"},
                    content=b'{\n"inputs": "What is machine learning?",\n"parameters": {\n"max_new_tokens": 100,\n'
                            b'"temperature": 0.7\n}\n}')
    assert r.status_code == 200 and set(r.json()) == {"generated_text"}  # sampled: the text itself varies
    assert isinstance(r.json()["generated_text"], str)
