"""Clients that go away mid-generation, over real HTTP: streaming or not, native or OpenAI, the
sequence leaves the batch and its KV slot, adapter pin and place in max_concurrent_requests come
back (read from /metrics) within seconds, though it asked for far more tokens than that allows."""

import json
import socket
import time
from urllib.parse import urlparse

import httpx
import pytest

from tests.adapter_factory import SPECS
from tests.conftest import metric, wait_until

ADAPTER = f"{SPECS[0].name}/1"
LONG = 1500  # tokens: ~30 s or more on a CPU if the request were not cancelled
GAUGES = ("loraserve_running_requests", "loraserve_in_flight_requests", "loraserve_kv_slots_used",
          "loraserve_pinned_adapters", "loraserve_queue_depth")
RELEASE_WITHIN_S = 5.0


def gauges(url: str) -> dict[str, float]:
    return {name: metric(url, name) for name in GAUGES}


def cancelled_count(url: str) -> float:
    return metric(url, "loraserve_generations_total", adapter=ADAPTER, finish_reason="cancelled")


def raw_post(url: str, path: str, body: dict) -> socket.socket:
    """Send a request and leave the response unread: closing the socket is the client going away."""
    parsed = urlparse(url)
    data = json.dumps(body).encode()
    sock = socket.create_connection((parsed.hostname, parsed.port))
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: {parsed.netloc}\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    return sock


def native_body() -> dict:
    return {"inputs": "Tell me a long story.", "parameters": {"max_new_tokens": LONG, "ignore_eos_token": True,
                                                               "adapter_id": ADAPTER}}


def openai_body(**extra) -> dict:
    return {"model": ADAPTER, "max_tokens": LONG, "ignore_eos_token": True, **extra}


CHAT = [{"role": "user", "content": "Tell me a long story."}]
STREAMS = {
    "native stream": ("/generate_stream", native_body()),
    "openai chat stream": ("/v1/chat/completions", openai_body(messages=CHAT, stream=True)),
    "openai completions stream, n=2": ("/v1/completions", openai_body(prompt="Once upon a time", n=2, stream=True)),
}
UNARY = {
    "native": ("/generate", native_body()),
    "openai chat": ("/v1/chat/completions", openai_body(messages=CHAT)),
    "openai completions, n=2": ("/v1/completions", openai_body(prompt="Once upon a time", n=2)),
}


def assert_released(url: str, baseline: dict[str, float], cancelled_before: float, rows: int) -> float:
    took = wait_until(lambda: gauges(url) == baseline, timeout=RELEASE_WITHIN_S)
    assert cancelled_count(url) - cancelled_before == rows
    return took


@pytest.mark.parametrize("case", STREAMS)
def test_a_streaming_client_that_leaves_frees_its_slot_and_adapter(server, case):
    path, body = STREAMS[case]
    baseline, cancelled_before = gauges(server.url), cancelled_count(server.url)
    rows = body.get("n", 1)
    with httpx.Client(base_url=server.url, timeout=60) as own:
        with own.stream("POST", path, json=body) as r:
            assert r.status_code == 200
            lines = r.iter_lines()  # held: a for-loop's own iterator would close the response at `break`
            data = (line for line in lines if line.startswith("data:"))
            for _ in range(4):
                next(data)
            during = gauges(server.url)
            assert during["loraserve_running_requests"] >= rows and during["loraserve_pinned_adapters"] >= 1, during
    assert_released(server.url, baseline, cancelled_before, rows)


@pytest.mark.parametrize("case", UNARY)
def test_a_waiting_client_that_leaves_frees_its_slot_and_adapter(server, case):
    path, body = UNARY[case]
    url = server.url
    baseline, cancelled_before = gauges(url), cancelled_count(url)
    closed_before = metric(url, "loraserve_http_requests_total", route=path, status="499")
    rows = body.get("n", 1)
    sock = raw_post(url, path, body)
    try:
        wait_until(lambda: metric(url, "loraserve_generated_tokens_total") > 0
                   and gauges(url)["loraserve_running_requests"] >= rows, timeout=60)
        during = gauges(url)
        assert during["loraserve_kv_slots_used"] >= rows and during["loraserve_pinned_adapters"] >= 1
        time.sleep(0.3)  # a few decode steps
    finally:
        sock.close()
    assert_released(url, baseline, cancelled_before, rows)
    wait_until(lambda: metric(url, "loraserve_http_requests_total", route=path, status="499") == closed_before + 1,
               timeout=RELEASE_WITHIN_S)
