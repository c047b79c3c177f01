"""Prometheus metrics, one registry per app (tests start several apps in one process).

Named and bucketed like vLLM's own series (`vllm/v1/metrics/loggers.py`), so a dashboard built for
vLLM reads these with a prefix changed: `_seconds`, `_total` and `_ratio` suffixes, TTFT buckets from
1 ms, latencies measured from the request's arrival (the request-id middleware notes it), so body,
validation, admission, image loading, routing and the engine's queue are all inside them.

Every HTTP request is counted once, by route template, status and adapter
(`loramux_requests_total`: error ratio = non-2xx / all), by `service.api.request_metrics`. The
per-generation series (TTFT, inter-token latency, queue time, end-to-end latency, token counts,
finish reasons) are recorded by the request path (`service.inference.generate_stream`). Engine gauges
(queue depth, running sequences, batch size) are read from the engine at scrape time, never pushed
from the hot path. With the vLLM engine, vLLM's own `vllm:*` series (its Prometheus stat logger, in
this process's default registry) are served on the same `/metrics`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics_core import Metric

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
CONFIDENCE_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)
# vLLM's defaults (vllm/v1/metrics/buckets.py), copied: the embedded engine runs without vLLM installed
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
INTER_TOKEN_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                       20.0, 40.0, 80.0)
REQUEST_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
                           120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)


def token_buckets(max_model_len: int) -> tuple[float, ...]:
    """vLLM's `request_tokens` family: 1, 2, 5, 10, 20, 50, ... up to the context length."""
    out: list[float] = []
    scale = 1
    while True:
        for mantissa in (1, 2, 5):
            if mantissa * scale > max_model_len:
                return tuple(out)
            out.append(mantissa * scale)
        scale *= 10


class PrefixedSeries:
    """A collector that serves the series of another registry whose names start with `prefix`:
    vLLM's stat logger registers `vllm:*` in prometheus_client's default registry, which also
    holds the process's own collectors (left out, as every app here has its own registry)."""

    def __init__(self, prefix: str, source: CollectorRegistry = REGISTRY):
        self.prefix = prefix
        self.source = source

    def collect(self) -> Iterator[Metric]:
        for metric in self.source.collect():
            if metric.name.startswith(self.prefix):
                yield metric


class Metrics:
    def __init__(self, max_model_len: int = 2048, engine_series: str | None = None) -> None:
        """`engine_series`: the name prefix of an engine's own series to serve too (`vllm:`)."""
        self.registry = CollectorRegistry()
        r = self.registry
        # every HTTP request, counted once it is over (service.api.request_metrics); not `requests`:
        # a handler must not count its own again
        self.http_requests = Counter(
            "loramux_requests_total",
            "HTTP requests by route template, adapter (`none` before one is chosen) and status (every status, "
            "errors included; a stream that failed after its 200 counts with the error's status, one whose client "
            "left as 499)", ["endpoint", "adapter", "status"], registry=r)
        self.errors = Counter("loramux_errors_total", "Errors by endpoint and error type", ["endpoint", "type"],
                              registry=r)
        self.e2e_latency = Histogram(
            "loramux_e2e_request_latency_seconds", "From the request's arrival to the end of its generation",
            ["endpoint", "adapter"], buckets=REQUEST_LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("loramux_time_to_first_token_seconds",
                              "From the request's arrival to its first generated token",
                              ["endpoint", "adapter"], buckets=TTFT_BUCKETS, registry=r)
        self.inter_token = Histogram("loramux_inter_token_latency_seconds",
                                     "Between two consecutive generated tokens of a request",
                                     ["adapter"], buckets=INTER_TOKEN_BUCKETS, registry=r)
        self.queue_time = Histogram(
            "loramux_request_queue_time_seconds",
            "From the request's arrival until it is handed to the engine (body, validation, admission, images, "
            "routing); waiting for a batch slot inside the engine is in TTFT",
            ["adapter"], buckets=REQUEST_LATENCY_BUCKETS, registry=r)
        tokens = token_buckets(max_model_len)
        self.prompt_tokens_hist = Histogram("loramux_request_prompt_tokens", "Prompt tokens per generation",
                                            ["adapter"], buckets=tokens, registry=r)
        self.generation_tokens_hist = Histogram("loramux_request_generation_tokens",
                                                "Generated tokens per generation", ["adapter"], buckets=tokens,
                                                registry=r)
        self.finished = Counter("loramux_request_success_total",
                                "Generations that finished, by the engine's finish reason (stop, length)",
                                ["adapter", "finished_reason"], registry=r)
        self.prompt_tokens = Counter("loramux_prompt_tokens_total", "Prompt tokens", ["adapter"], registry=r)
        self.generated_tokens = Counter("loramux_generated_tokens_total", "Generated tokens", ["adapter"], registry=r)
        self.route_decisions = Counter("loramux_routing_decisions_total", "Routing decisions by chosen adapter",
                                       ["adapter"], registry=r)
        self.route_fallbacks = Counter("loramux_routing_fallbacks_total", "Routing decisions below the threshold",
                                       registry=r)
        self.route_confidence = Histogram("loramux_routing_confidence_ratio",
                                          "Confidence of routing decisions (0 to 1)",
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
        if engine_series:
            r.register(PrefixedSeries(engine_series))

    def render(self, engine_stats: Callable[[], dict[str, Any]], inflight: int, loaded: int, failed: int) -> bytes:
        stats = engine_stats()
        self.engine_waiting.set(stats.get("waiting", 0))
        self.engine_running.set(stats.get("running", 0))
        self.batch_size.set(stats.get("batch_size", 0))
        self.queue_depth.set(inflight)
        self.adapters_loaded.set(loaded)
        self.adapters_failed.set(failed)
        return generate_latest(self.registry)
