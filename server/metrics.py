"""Prometheus metrics. Counters on the hot path are a few cheap increments per step; adapter-tier
numbers are read from the store and device tier only when /metrics is scraped."""

from __future__ import annotations

from typing import Callable, Iterator, Optional

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

REGISTRY = CollectorRegistry()

HTTP_REQUESTS = Counter("loraserve_http_requests", "HTTP requests by route and status",
                        ["route", "status"], registry=REGISTRY)
GENERATIONS = Counter("loraserve_generations", "Finished generations by adapter and finish reason",
                      ["adapter", "finish_reason"], registry=REGISTRY)
REJECTED = Counter("loraserve_rejected_requests", "Requests refused for overload, by reason "
                   "(max_concurrent_requests: at admission; queue_timeout: waited past max_queue_wait_s)",
                   ["reason"], registry=REGISTRY)
GENERATED_TOKENS = Counter("loraserve_generated_tokens", "Tokens generated", registry=REGISTRY)
BATCH_SIZE = Histogram("loraserve_batch_size", "Sequences per forward pass", ["kind"], registry=REGISTRY,
                       buckets=(1, 2, 4, 8, 16, 32, 64, 128))
STEP_SECONDS = Histogram("loraserve_step_seconds", "Duration of one engine step", ["kind"], registry=REGISTRY,
                         buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2))
STEP_DEVICE_SECONDS = Histogram("loraserve_step_device_seconds", "GPU time of one engine step's forward pass "
                                "(CUDA; loraserve_step_seconds minus this is the host's share)", ["kind"],
                                registry=REGISTRY, buckets=(0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0))
TTFT_SECONDS = Histogram("loraserve_time_to_first_token_seconds", "Arrival to first token", registry=REGISTRY,
                         buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
PREFIX_LOOKUP_TOKENS = Counter("loraserve_prefix_cache_lookup_tokens", "Prompt tokens looked up in the KV "
                               "prefix cache at admission", registry=REGISTRY)
PREFIX_HIT_TOKENS = Counter("loraserve_prefix_cache_hit_tokens", "Prompt tokens whose KV blocks were reused from the "
                            "prefix cache (same adapter, same tokens so far)", registry=REGISTRY)
PREEMPTIONS = Counter("loraserve_preemptions", "Running requests preempted because the KV pool ran out "
                      "(their blocks freed; recomputed when admitted again)", registry=REGISTRY)
ITL_SECONDS = Histogram("loraserve_inter_token_seconds", "Gap between a request's tokens", registry=REGISTRY,
                        buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.4, 0.8, 1.6))


class EngineCollector:
    """Gauges and tier counters sampled at scrape time from the live engine (set by the app)."""

    snapshot: Optional[Callable[[], dict]] = None

    def collect(self) -> Iterator:
        if self.snapshot is None:
            return
        s = self.snapshot()
        for name, help_text in (("queue_depth", "Requests waiting for admission"),
                                ("running_requests", "Requests in the running batch"),
                                ("in_flight_requests", "Accepted requests not yet finished"),
                                ("kv_slots_used", "KV-cache slots held by running requests"),
                                ("kv_cache_used_bytes", "KV-cache bytes holding running requests' tokens"),
                                ("kv_cache_capacity_bytes", "KV-cache bytes allocated (paged: the whole pool)"),
                                ("prefix_cache_blocks", "KV blocks holding a cached prefix (in use or idle)"),
                                ("pinned_adapters", "Device adapters pinned by running requests"),
                                ("device_adapters", "Adapters resident on the device"),
                                ("cpu_adapters", "Adapters in the CPU tier")):
            yield GaugeMetricFamily(f"loraserve_{name}", help_text, value=s[name])
        events = CounterMetricFamily("loraserve_adapter_events", "Adapter loads, evictions and failures by tier",
                                     labels=["tier", "event"])
        for (tier, event), value in s["adapter_events"].items():
            events.add_metric([tier, event], value)
        yield events


ENGINE_COLLECTOR = EngineCollector()
REGISTRY.register(ENGINE_COLLECTOR)


def adapter_label(adapter) -> str:
    """Bounded label values: merged adapters (ids are their whole spec) count as one."""
    if adapter is None:
        return ""
    return "merged" if adapter.key.source == "merged" else str(adapter.key)
