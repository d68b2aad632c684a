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
