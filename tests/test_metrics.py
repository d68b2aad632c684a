"""Prometheus /metrics on the shared server: requests by route/status, tokens, latencies, adapter tiers."""

from prometheus_client.parser import text_string_to_metric_families

from tests.adapter_factory import SPECS


def scrape(client) -> dict:
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def value(samples, name, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_count_what_happened(client):
    before = scrape(client)
    client.post("/generate", json={"inputs": "Hi", "parameters": {"max_new_tokens": 3, "ignore_eos_token": True}})
    client.post("/generate", json={"inputs": "Hi", "parameters": {"max_new_tokens": 3,
                                                                  "adapter_id": f"{SPECS[2].name}/1"}})
    client.post("/generate", json={"inputs": "Hi", "parameters": {"max_new_tokens": 0}})
    after = scrape(client)
    ok = "loraserve_http_requests_total"
    assert value(after, ok, route="/generate", status="200") - value(before, ok, route="/generate", status="200") == 2
    assert value(after, ok, route="/generate", status="422") > value(before, ok, route="/generate", status="422")
    assert value(after, "loraserve_generated_tokens_total") - value(before, "loraserve_generated_tokens_total") >= 4
    assert value(after, "loraserve_time_to_first_token_seconds_count") > value(
        before, "loraserve_time_to_first_token_seconds_count")
    by_adapter = sum(v for (name, labels), v in after.items()
                     if name == "loraserve_generations_total" and ("adapter", f"{SPECS[2].name}/1") in labels)
    assert by_adapter >= 1
    assert value(after, "loraserve_adapter_events_total", tier="device", event="load") >= 1
    assert ("loraserve_queue_depth", ()) in after and ("loraserve_running_requests", ()) in after


def test_request_ids_reach_the_response_and_the_json_log(client, server):
    import json

    from tests.conftest import ROOT

    mine = client.post("/generate", headers={"x-request-id": "trace-abc-123"},
                       json={"inputs": "Hi", "parameters": {"max_new_tokens": 2}})
    assert mine.headers["x-request-id"] == "trace-abc-123"
    fresh = client.get("/info").headers["x-request-id"]
    assert len(fresh) == 32 and client.get("/info").headers["x-request-id"] != fresh
    assert client.get("/info", headers={"x-request-id": "bad id with spaces"}).headers["x-request-id"] != \
        "bad id with spaces"
    log = (ROOT / ".pytest_cache" / f"server-{server.port}.log").read_text().splitlines()
    entries = [json.loads(line) for line in log if line.startswith("{")]
    assert entries and all({"ts", "level", "logger", "msg"} <= set(e) for e in entries)
    assert any(e.get("request_id") == "trace-abc-123" and "/generate" in e["msg"] for e in entries)
