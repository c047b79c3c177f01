"""The HTTP API on a real `loramux serve` (127.0.0.1, real model, real adapters)."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.conftest import TASK_ADAPTERS


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=120) as c:
        yield c


def assert_error(response: httpx.Response, status: int, param: str | None = "ANY") -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code", "request_id"}
    assert body["error"]["request_id"] == response.headers["x-request-id"]
    assert body["error"]["code"] == status and body["error"]["message"]
    if param != "ANY":
        assert body["error"]["param"] == param
    return body["error"]


def test_health_ready(client):
    assert client.get("/health").json() == {"status": "ok"}
    ready = client.get("/ready").json()
    assert ready["status"] == "ready" and ready["adapters_loaded"] == 4


def test_generate_pinned(client):
    r = client.post("/generate", json={"prompt": "Name a colour.", "adapter": "beta", "max_tokens": 8})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["adapter"] == "beta" and body["version"] == 1 and body["routing"] is None
    assert body["finish_reason"] in ("stop", "length") and body["text"]
    assert body["usage"]["completion_tokens"] <= 8
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"]
    assert body["timings"]["total_ms"] > 0 and r.headers["x-loramux-adapter"] == "beta@1"


def test_generate_with_messages_and_stop(client):
    """The stop string is a word of the same request's answer without it, so it would appear: with it,
    the answer is exactly the text before it, finish_reason "stop", and fewer tokens were generated."""
    messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Count: one two"}]
    request = {"messages": messages, "adapter": "alpha", "max_tokens": 16, "temperature": 0}
    full = client.post("/generate", json=request).json()
    words = full["text"].split()
    assert len(words) >= 2, full
    r = client.post("/generate", json={**request, "stop": [words[1]]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["finish_reason"] == "stop" and body["text"] == full["text"][: full["text"].index(words[1])]
    assert body["usage"]["completion_tokens"] < full["usage"]["completion_tokens"]


def test_generate_routed_carries_the_decision(client):
    r = client.post("/generate", json={"prompt": "Turn on the lights in the kitchen", "max_tokens": 4})
    assert r.status_code == 200, r.text
    body = r.json()
    routing = body["routing"]
    assert routing["adapter"] == body["adapter"] and body["adapter"] in TASK_ADAPTERS
    assert sum(c["probability"] for c in routing["candidates"]) == pytest.approx(1.0)
    assert {c["adapter"] for c in routing["candidates"]} == set(TASK_ADAPTERS)
    assert routing["router"] == {"name": "router", "version": 1}
    assert json.loads(r.headers["x-loramux-route"])["adapter"] == body["adapter"]


def test_route_endpoint(client):
    r = client.post("/route", json={"messages": [{"role": "user", "content": "What's the weather tomorrow?"}]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["adapter"] in TASK_ADAPTERS and body["fallback"] is False
    probs = {c["adapter"]: c["probability"] for c in body["candidates"]}
    assert body["confidence"] == pytest.approx(max(probs.values()), abs=1e-6)
    assert probs[body["adapter"]] == max(probs.values())
    assert sum(probs.values()) == pytest.approx(1.0)


def test_messages_without_content_are_empty_text(client):
    """A message may omit `content` (OpenAI allows it for some roles): it renders as empty text."""
    messages = [{"role": "developer"}, {"role": "user", "content": None},
                {"role": "user", "content": [{"type": "text", "text": "set a timer"}]}]
    spelled_out = [{"role": "developer", "content": ""}, {"role": "user", "content": ""},
                   {"role": "user", "content": "set a timer"}]
    request = {"adapter": "beta", "max_tokens": 6, "temperature": 0}
    r = client.post("/generate", json={"messages": messages, **request})
    assert r.status_code == 200, r.text
    same = client.post("/generate", json={"messages": spelled_out, **request}).json()
    assert r.json()["text"] == same["text"] and r.json()["usage"] == same["usage"]
    routed = client.post("/route", json={"messages": messages})
    assert routed.status_code == 200, routed.text
    assert routed.json()["candidates"] == client.post("/route", json={"messages": spelled_out}).json()["candidates"]


def test_streaming_sse(client):
    with client.stream("POST", "/generate",
                       json={"prompt": "Say hello", "adapter": "gamma", "max_tokens": 6, "stream": True}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    final = json.loads(events[-2])
    pieces = [json.loads(e)["text"] for e in events[:-2]]
    assert "".join(pieces) == final["text"] and final["adapter"] == "gamma"
    assert final["usage"]["completion_tokens"] == 6 or final["finish_reason"] == "stop"


@pytest.mark.parametrize(
    ("payload", "status", "param"),
    [
        ({"prompt": "hi", "adapter": "nope"}, 404, "adapter"),
        ({"prompt": "hi", "adapter": "alpha", "max_tokens": -1}, 400, "max_tokens"),
        ({"prompt": "hi", "adapter": "alpha", "max_tokens": "many"}, 400, "max_tokens"),
        ({"prompt": 5, "adapter": "alpha"}, 400, "prompt"),
        ({"prompt": "hi", "messages": [{"role": "user", "content": "hi"}]}, 400, None),
        ({"adapter": "alpha"}, 400, None),
        ({"prompt": "hi", "adapter": "alpha", "temperature": 9}, 400, "temperature"),
        ({"prompt": "hi", "adapter": "alpha", "unknown_field": 1}, 400, "unknown_field"),
        ({"prompt": "word " * 600, "adapter": "alpha", "max_tokens": 8}, 400, "prompt"),
        ({"prompt": "hi", "adapter": "alpha", "max_tokens": 100000}, 400, "max_tokens"),
        ({"messages": [], "adapter": "alpha"}, 400, "messages"),
        ({"messages": [{"role": "wizard", "content": "x"}], "adapter": "alpha"}, 400, "messages.0.role"),
    ],
)
def test_bad_input_gets_the_error_body(client, payload, status, param):
    assert_error(client.post("/generate", json=payload), status, param)


def test_malformed_json_and_unknown_route(client):
    r = client.post("/generate", content=b'{"prompt": ', headers={"content-type": "application/json"})
    assert_error(r, 400, "body")
    assert_error(client.get("/no/such/route"), 404)
    assert_error(client.get("/generate"), 405)


def test_server_keeps_serving_after_errors(client):
    """Malformed bodies are each the client's 400, and change nothing: the same request answers the
    same text before and after them."""
    request = {"prompt": "ok?", "adapter": "alpha", "max_tokens": 2, "temperature": 0}
    before = client.post("/generate", json=request)
    assert before.status_code == 200, before.text
    for _ in range(3):
        assert_error(client.post("/generate", content=b"garbage", headers={"content-type": "application/json"}), 400)
    after = client.post("/generate", json=request)
    assert after.status_code == 200 and after.json()["text"] == before.json()["text"], after.text


def test_metrics_are_labelled_by_adapter(client):
    client.post("/generate", json={"prompt": "hi", "adapter": "alpha", "max_tokens": 2})
    text = client.get("/metrics").text
    assert 'loramux_requests_total{adapter="alpha",endpoint="generate",status="200"}' in text
    assert 'loramux_generated_tokens_total{adapter="alpha"}' in text
    assert "loramux_time_to_first_token_seconds_bucket" in text
    assert "loramux_adapters_loaded 4.0" in text
    assert "loramux_routing_decisions_total" in text and "loramux_router_latency_seconds" in text


def test_a_huge_prompt_is_routed_on_its_start_and_refused_for_generation(client):
    """1.5 MB of text (under the body limit): the router reads its first tokens only (a bounded
    forward pass, the same decision as for the start alone), generation refuses it with a 400."""
    start = "turn on the kitchen lights please "
    huge = start + "and also " * (1_500_000 // 9)
    assert len(huge) > 1_400_000
    routed = client.post("/route", json={"prompt": huge})
    assert routed.status_code == 200, routed.text
    short = client.post("/route", json={"prompt": huge[:2000]}).json()
    assert routed.json()["adapter"] == short["adapter"]
    assert routed.json()["candidates"] == short["candidates"]
    routed_before = routing_decisions(client)
    refused = client.post("/v1/chat/completions", json={"model": "auto", "max_tokens": 4,
                                                        "messages": [{"role": "user", "content": huge}]})
    # refused on its byte length alone: "too long", not a token count (it was never tokenized)
    assert "is too long" in assert_error(refused, 400, "messages")["message"]
    refused = client.post("/generate", json={"prompt": huge, "max_tokens": 4})
    assert "is too long" in assert_error(refused, 400, "prompt")["message"]
    # and before routing: a router forward pass for a request certain to be refused holds up every
    # running generation for it (about a second of one core for the router's 256 tokens)
    assert routing_decisions(client) == routed_before
    assert client.get("/health").json() == {"status": "ok"}


def routing_decisions(client: httpx.Client) -> float:
    """Every routing decision the server made so far, from `/metrics`."""
    return sum(float(line.rsplit(" ", 1)[1]) for line in client.get("/metrics").text.splitlines()
               if line.startswith("loramux_routing_decisions_total{"))
