"""`/metrics` on the real server (conftest's): the request counter sees every status by route template
and adapter, the generation histograms run from the request's arrival, and no client-chosen text
(a path, an unknown adapter name) ever becomes a label value."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.slow

CHAT = {"model": "alpha", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}


def scrape(server) -> tuple[str, dict[tuple[str, frozenset], float]]:
    text = httpx.get(f"{server.url}/metrics", timeout=30).text
    samples = {(s.name, frozenset(s.labels.items())): s.value
               for family in text_string_to_metric_families(text) for s in family.samples}
    return text, samples


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def test_every_status_is_counted_by_endpoint_and_adapter(server):
    _, before = scrape(server)
    unknown = f"nope-{uuid.uuid4().hex[:8]}"
    probe = f"/probe-{uuid.uuid4().hex}"
    url = f"{server.url}/v1/chat/completions"
    assert httpx.post(url, json=CHAT, timeout=120).status_code == 200
    assert httpx.post(url, json={**CHAT, "max_tokens": -1}, timeout=120).status_code == 400
    assert httpx.post(url, json={**CHAT, "model": unknown}, timeout=120).status_code == 404
    assert httpx.get(f"{server.url}{probe}", timeout=30).status_code == 404
    # refused by the closed admin API before its body is read: still counted, under its own route
    assert httpx.post(f"{server.url}/v1/load_lora_adapter", json={}, timeout=30).status_code == 403
    text, after = scrape(server)
    name = "loramux_requests_total"
    for adapter, status in (("alpha", "200"), ("none", "400"), ("none", "404")):
        grew = (value(after, name, endpoint="v1_chat_completions", adapter=adapter, status=status)
                - value(before, name, endpoint="v1_chat_completions", adapter=adapter, status=status))
        assert grew == 1, (adapter, status, grew)
    assert value(after, name, endpoint="unmatched", adapter="none", status="404") >= 1
    assert value(after, name, endpoint="v1_load_lora_adapter", adapter="none", status="403") >= 1
    assert unknown not in text and probe.strip("/") not in text  # random names add no series


def test_generation_histograms_run_from_the_requests_arrival(server):
    """A body that takes 1.2 s to arrive: TTFT and end-to-end latency count that time (they start at
    the request's arrival, not at the engine), so this request lands above the 1 s bucket."""
    _, before = scrape(server)
    body = b'{"prompt": "Hi", "adapter": "alpha", "max_tokens": 3}'

    def slowly() -> Iterator[bytes]:
        yield body[:10]
        time.sleep(1.2)
        yield body[10:]

    r = httpx.post(f"{server.url}/generate", content=slowly(), headers={"content-type": "application/json"},
                   timeout=120)
    assert r.status_code == 200, r.text
    timings = r.json()["timings"]  # the response's own: from the generation's start
    _, after = scrape(server)

    def grew(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    labels = {"endpoint": "generate", "adapter": "alpha"}
    for series, since_start in (("loramux_time_to_first_token_seconds", timings["ttft_ms"]),
                                ("loramux_e2e_request_latency_seconds", timings["generate_ms"])):
        assert grew(f"{series}_count", **labels) == 1, series
        assert grew(f"{series}_bucket", **labels, le="1.0") == 0, series  # the slow body is inside
        # whatever the machine's load: the body's 1.2 s on top of what the generation itself took
        assert grew(f"{series}_sum", **labels) >= 1.2 + since_start / 1000 - 0.01, series
    assert grew("loramux_request_queue_time_seconds_count", adapter="alpha") == 1
    assert grew("loramux_request_queue_time_seconds_sum", adapter="alpha") >= 1.0
    assert grew("loramux_request_prompt_tokens_count", adapter="alpha") == 1
    assert grew("loramux_request_generation_tokens_sum", adapter="alpha") == r.json()["usage"]["completion_tokens"]
    if r.json()["usage"]["completion_tokens"] > 1:
        assert grew("loramux_inter_token_latency_seconds_count", adapter="alpha") >= 1
    finish = r.json()["finish_reason"]
    assert grew("loramux_request_success_total", adapter="alpha", finished_reason=finish) == 1


def test_a_stream_left_by_its_client_counts_as_499(server):
    _, before = scrape(server)
    labels = {"endpoint": "generate", "adapter": "alpha", "status": "499"}
    body = {"prompt": "Tell a long story", "adapter": "alpha", "max_tokens": 300, "stream": True}
    with httpx.stream("POST", f"{server.url}/generate", json=body, timeout=120) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: "):
                break
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        _, after = scrape(server)
        if value(after, "loramux_requests_total", **labels) > value(before, "loramux_requests_total", **labels):
            break
        time.sleep(0.2)
    assert value(after, "loramux_requests_total", **labels) == value(before, "loramux_requests_total", **labels) + 1
    assert value(after, "loramux_requests_total", endpoint="generate", adapter="alpha", status="200") == value(
        before, "loramux_requests_total", endpoint="generate", adapter="alpha", status="200")
