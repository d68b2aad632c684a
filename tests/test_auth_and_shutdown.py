"""API keys on every route but /health (route-family error shapes), and graceful SIGTERM."""

import signal
import threading
import time

import httpx
import openai
import pytest

from tests.conftest import ServerProcess

KEYS = ("key-one-123456", "key-two-654321")


@pytest.fixture(scope="module")
def guarded(loaded):
    proc = ServerProcess("--api-key", KEYS[0], "--api-key", KEYS[1], "--max-batch-size", "4").wait_ready()
    yield proc
    if proc.proc.poll() is None:
        proc.stop()


def test_health_is_open_everything_else_needs_a_key(guarded):
    assert httpx.get(guarded.url + "/health").status_code == 200
    body = {"inputs": "Hi", "parameters": {"max_new_tokens": 2}}
    for headers in ({}, {"Authorization": "Bearer wrong-key-000"}, {"Authorization": KEYS[0]}):
        r = httpx.post(guarded.url + "/generate", json=body, headers=headers)
        assert r.status_code == 401 and r.json()["error_type"] == "unauthorized", headers
    r = httpx.get(guarded.url + "/v1/models")
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    ok = httpx.post(guarded.url + "/generate", json=body, headers={"Authorization": f"Bearer {KEYS[1]}"}, timeout=60)
    assert ok.status_code == 200


def test_the_openai_sdk_passes_its_key(guarded):
    good = openai.OpenAI(base_url=guarded.url + "/v1", api_key=KEYS[0], max_retries=0)
    assert good.models.list().data
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=guarded.url + "/v1", api_key="nope-nope-nope", max_retries=0).models.list()


def test_sigterm_lets_in_flight_requests_finish_then_exits_zero(guarded):
    result = {}

    def long_request():
        result["response"] = httpx.post(guarded.url + "/generate", timeout=120, headers={
            "Authorization": f"Bearer {KEYS[0]}"}, json={"inputs": "Tell me a story.", "parameters": {
                "max_new_tokens": 40, "ignore_eos_token": True, "details": True}})

    worker = threading.Thread(target=long_request)
    worker.start()
    time.sleep(1.5)  # the request is decoding
    guarded.proc.send_signal(signal.SIGTERM)
    worker.join(timeout=120)
    assert result["response"].status_code == 200
    assert result["response"].json()["details"]["generated_tokens"] == 40
    assert guarded.proc.wait(timeout=60) == 0
    with pytest.raises(httpx.ConnectError):
        httpx.get(guarded.url + "/health", timeout=2)


def test_short_api_keys_are_refused_at_start():
    from server.config import ConfigError, load_settings

    with pytest.raises(ConfigError, match="at least 8 characters"):
        load_settings(overrides={"api_keys": ("short",)}, environ={})
