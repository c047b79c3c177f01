"""Prometheus metrics, one registry per app (tests start several apps in one process).

Counters and histograms are labelled by adapter so an operator sees each expert's traffic,
latency and errors; engine gauges (queue depth, running sequences, batch size) are read from the
engine at scrape time, never pushed from the hot path.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
CONFIDENCE_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("loramux_requests_total", "Requests by endpoint, adapter and status code",
                                ["endpoint", "adapter", "status"], registry=r)
        self.errors = Counter("loramux_errors_total", "Errors by endpoint and error type", ["endpoint", "type"],
                              registry=r)
        self.latency = Histogram("loramux_request_latency_seconds", "End-to-end request latency",
                                 ["endpoint", "adapter"], buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("loramux_time_to_first_token_seconds", "Time to first generated token",
                              ["adapter"], buckets=LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("loramux_prompt_tokens_total", "Prompt tokens", ["adapter"], registry=r)
        self.generated_tokens = Counter("loramux_generated_tokens_total", "Generated tokens", ["adapter"], registry=r)
        self.route_decisions = Counter("loramux_routing_decisions_total", "Routing decisions by chosen adapter",
                                       ["adapter"], registry=r)
        self.route_fallbacks = Counter("loramux_routing_fallbacks_total", "Routing decisions below the threshold",
                                       registry=r)
        self.route_confidence = Histogram("loramux_routing_confidence", "Confidence of routing decisions",
                                          buckets=CONFIDENCE_BUCKETS, registry=r)
        self.route_latency = Histogram("loramux_router_latency_seconds", "Time to take a routing decision",
                                       buckets=LATENCY_BUCKETS, registry=r)
        self.shadow_agreement = Counter("loramux_shadow_routing_total",
                                        "Shadow routing comparisons (candidate router vs active)",
                                        ["active", "candidate", "agree"], registry=r)
        self.shadow_failures = Counter("loramux_shadow_routing_failures_total",
                                       "Shadow decisions that failed (the candidate's fault, never the request's)",
                                       registry=r)
        self.adapters_loaded = Gauge("loramux_adapters_loaded", "Adapter versions resident in the engine",
                                     registry=r)
        self.adapters_failed = Gauge("loramux_adapters_failed", "Registered adapters that failed to load",
                                     registry=r)
        self.queue_depth = Gauge("loramux_queue_depth", "Requests admitted and not yet finished", registry=r)
        self.engine_waiting = Gauge("loramux_engine_waiting", "Requests waiting for a batch slot", registry=r)
        self.engine_running = Gauge("loramux_engine_running", "Sequences in the running batch", registry=r)
        self.batch_size = Gauge("loramux_batch_size", "Sequences in the last decode step", registry=r)

    def render(self, engine_stats: Callable[[], dict[str, Any]], inflight: int, loaded: int, failed: int) -> bytes:
        stats = engine_stats()
        self.engine_waiting.set(stats.get("waiting", 0))
        self.engine_running.set(stats.get("running", 0))
        self.batch_size.set(stats.get("batch_size", 0))
        self.queue_depth.set(inflight)
        self.adapters_loaded.set(loaded)
        self.adapters_failed.set(failed)
        return generate_latest(self.registry)
