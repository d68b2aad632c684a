"""Overload over real HTTP: a burst of several times max_concurrent_requests gets exactly the overflow
429 while every accepted request completes with peft's greedy tokens; a request that waits longer
than max_queue_wait_s for the batch gets 429 in its route family's shape (the openai SDK raises
RateLimitError); both are counted in /metrics and nothing is left holding a place afterwards."""

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from tests.adapter_factory import SPECS
from tests.conftest import ADAPTER_PROMPTS, NEW_TOKENS, ServerProcess, metric, wait_until

LIMIT = 4
REJECTED = "loraserve_rejected_requests_total"
COMBOS = [(name, prompt) for prompt in ADAPTER_PROMPTS for name in (None, *(s.name for s in SPECS))]


@pytest.fixture(scope="module")
def burst_server(loaded, adapter_root):
    """max_concurrent_requests == max_batch_size: nothing queues, so acceptance is decided at the door."""
    preload = ",".join(f"{s.name}/1" for s in SPECS)  # loads are not what this test is about
    proc = ServerProcess("--max-concurrent-requests", str(LIMIT), "--max-batch-size", str(LIMIT),
                         env={"LORASERVE_ADAPTERS_DIR": str(adapter_root), "LORASERVE_PRELOAD_ADAPTERS": preload})
    yield proc.wait_ready()
    proc.stop()


@pytest.fixture(scope="module")
def one_slot(loaded):
    proc = ServerProcess("--max-batch-size", "1", "--max-concurrent-requests", "8", "--max-queue-wait-s", "1")
    yield proc.wait_ready()
    proc.stop()


def payload(index: int) -> tuple[str | None, str, dict]:
    name, prompt = COMBOS[index % len(COMBOS)]
    params = {"max_new_tokens": NEW_TOKENS, "details": True, "adapter_id": f"{name}/1" if name else None}
    return name, prompt, {"inputs": prompt, "parameters": params}


async def fire_at_once(url: str, bodies: list[dict]) -> list[tuple[httpx.Response, float]]:
    """All requests concurrently, each on its own connection; (response, seconds until it returned)."""
    async with httpx.AsyncClient(base_url=url, timeout=120,
                                 limits=httpx.Limits(max_connections=len(bodies))) as client:
        started = time.monotonic()

        async def one(body: dict) -> tuple[httpx.Response, float]:
            response = await client.post("/generate", json=body)
            return response, time.monotonic() - started

        return await asyncio.gather(*(one(b) for b in bodies))


@pytest.mark.parametrize("factor", [4, 8])
def test_a_burst_gets_exactly_the_overflow_429_and_the_rest_right(burst_server, references, factor):
    url = burst_server.url
    rejected_before = metric(url, REJECTED, reason="max_concurrent_requests")
    sent = [payload(i) for i in range(LIMIT * factor)]
    results = asyncio.run(fire_at_once(url, [body for _, _, body in sent]))

    ok = [(name, prompt, r, t) for (name, prompt, _), (r, t) in zip(sent, results) if r.status_code == 200]
    refused = [(r, t) for r, t in results if r.status_code == 429]
    assert len(ok) + len(refused) == len(sent), [r.text for r, _ in results if r.status_code not in (200, 429)]
    # "exactly" holds because every refusal came back before any accepted request finished
    assert max(t for _, t in refused) < min(t for *_, t in ok), "a place freed up during the burst: too slow to tell"
    assert len(ok) == LIMIT and len(refused) == LIMIT * (factor - 1)
    for r, _ in refused:
        assert r.json() == {"error": r.json()["error"], "error_type": "overloaded"}
        assert "max_concurrent_requests" in r.json()["error"]
    for name, prompt, r, _ in ok:
        assert [t["id"] for t in r.json()["details"]["tokens"]] == references[(name, prompt)], (name, prompt)
        assert r.headers["x-adapter-id"] == (f"{name}/1" if name else "")
    assert metric(url, REJECTED, reason="max_concurrent_requests") - rejected_before == LIMIT * (factor - 1)
    assert metric(url, "loraserve_in_flight_requests") == 0 and metric(url, "loraserve_kv_slots_used") == 0
    name, prompt, body = payload(1)  # the door is open again
    after = httpx.post(url + "/generate", json=body, timeout=120)
    assert [t["id"] for t in after.json()["details"]["tokens"]] == references[(name, prompt)]


def stream_status(url: str, body: dict) -> tuple[int, dict]:
    with httpx.stream("POST", url, json=body, timeout=60) as r:
        return r.status_code, r.read() and r.json()


def openai_sdk_chat(url: str) -> openai.RateLimitError:
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.RateLimitError) as caught:
        client.chat.completions.create(model="", max_tokens=2, messages=[{"role": "user", "content": "Hi"}])
    return caught.value


def test_a_request_that_waits_past_max_queue_wait_gets_429_in_each_family(one_slot):
    url = one_slot.url
    timeouts_before = metric(url, REJECTED, reason="queue_timeout")
    short = {"inputs": "Hi", "parameters": {"max_new_tokens": 2}}
    holder_body = {"inputs": "Tell me a story.", "parameters": {"max_new_tokens": 150, "ignore_eos_token": True}}
    with ThreadPoolExecutor(5) as pool:
        holder = pool.submit(httpx.post, url + "/generate", json=holder_body, timeout=120)
        wait_until(lambda: metric(url, "loraserve_running_requests") == 1, timeout=30)
        started = time.monotonic()
        native = pool.submit(httpx.post, url + "/generate", json=short, timeout=60)
        stream = pool.submit(stream_status, url + "/generate_stream", short)
        completion = pool.submit(httpx.post, url + "/v1/completions", timeout=60,
                                 json={"model": "", "prompt": "Hi", "max_tokens": 2})
        sdk = pool.submit(openai_sdk_chat, url)
        answers = [f.result() for f in (native, stream, completion, sdk)]
        waited = time.monotonic() - started
        assert not holder.done(), "the batch slot freed up before the queue limit: the test proves nothing"
        assert holder.result().status_code == 200

    native_r, (stream_status_code, stream_body), completion_r, sdk_error = answers
    assert waited >= 1.0
    assert native_r.status_code == 429 and native_r.json()["error_type"] == "overloaded"
    assert "max_queue_wait_s" in native_r.json()["error"]
    assert stream_status_code == 429 and stream_body["error_type"] == "overloaded"  # not a 200 stream with an error
    assert completion_r.status_code == 429
    assert completion_r.json()["error"]["type"] == "overloaded" and completion_r.json()["error"]["code"] == 429
    assert sdk_error.status_code == 429 and "max_queue_wait_s" in sdk_error.message
    assert metric(url, REJECTED, reason="queue_timeout") - timeouts_before == 4
    assert metric(url, "loraserve_in_flight_requests") == 0 and metric(url, "loraserve_queue_depth") == 0
    assert httpx.post(url + "/generate", json=short, timeout=60).status_code == 200
