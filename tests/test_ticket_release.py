"""Every request path gives back what it took: its admission slot and its hold on the adapter.

Driven in process, on the real app with a small fake engine, so faults can be planted where no
real request can reach them: errors while the response is built (its headers, the stream object),
while the prompt is tokenized, and inside a running stream. After each, the in-flight gauge (the
admission count `/metrics` reports as `loramux_queue_depth`) is back to zero and no adapter is held.
Also: a request holds its adapter from the moment it was chosen, pinned or routed, until its
generation ends, so a rollback in between waits for it instead of unloading the weights under it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.adapter_validation import BaseModules
from service.adapters import AdapterManager
from service.api import streaming
from service.api.app import create_app
from service.api.generate import serving as generate_serving
from service.api.openai import serving as openai_serving
from service.base_model import BaseModelInfo
from service.build_status import BuildStatusReader, status_path
from service.engine.base import AdapterRef, Engine, SamplingParams, TokenDelta
from service.inference import choose, generate_stream
from service.metrics import Metrics
from service.registry import Registry
from service.routing.router import Router
from service.settings import Settings
from service.state import Admission, ServiceState


class FakeTokenizer:
    eos_token_id = 0

    def apply_chat_template(self, messages: list[dict], **_: Any) -> list[int]:
        return [1, 2, 3]

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [ord(c) % 50 + 1 for c in text]


class FakeEngine(Engine):
    """Loads anything, generates a few tokens; remembers which adapters are resident and fails a
    generation on one that is not (as both real engines do)."""

    name = "fake"

    def __init__(self) -> None:
        self.resident: set[str] = set()
        self.fail_mid_stream = False
        self.score_gate: asyncio.Event | None = None
        self.probe: Callable[[], None] | None = None  # called at each token: what holds while generating

    async def start(self) -> None: ...

    async def shutdown(self) -> None: ...

    @property
    def tokenizer(self) -> Any:
        return FakeTokenizer()

    @property
    def modules(self) -> BaseModules:
        return BaseModules(frozenset({"q_proj", "v_proj"}), {})

    async def add_adapter(self, adapter: AdapterRef) -> None:
        self.resident.add(adapter.key)

    async def remove_adapter(self, adapter: AdapterRef) -> None:
        self.resident.discard(adapter.key)

    def loaded_adapters(self) -> list[str]:
        return sorted(self.resident)

    async def generate(self, request_id: str, prompt_ids: Sequence[int], adapter: AdapterRef | None,
                       params: SamplingParams, images: Sequence[Any] = ()) -> AsyncIterator[TokenDelta]:
        for i in range(3):
            await asyncio.sleep(0)
            if adapter is not None and adapter.key not in self.resident:
                raise RuntimeError(f"adapter {adapter.key} is not loaded")
            if self.fail_mid_stream and i == 1:
                raise RuntimeError("engine fault mid-stream")
            if self.probe is not None:
                self.probe()
            yield TokenDelta("x", i + 1, "length" if i == 2 else None)

    async def abort(self, request_id: str) -> None: ...

    async def next_token_logprobs(self, prompt_ids, adapter, token_ids, prefix_len=0, images=()) -> list[float]:
        return [0.0 for _ in token_ids]

    async def sequence_logprobs(self, prompt_ids, adapter, continuations, images=(), prefix_len=0) -> list[float]:
        if self.score_gate is not None:
            await self.score_gate.wait()
        if adapter is not None and adapter.key not in self.resident:
            raise RuntimeError(f"router {adapter.key} is not loaded")
        return [-float(i) for i in range(len(continuations))]  # the first candidate wins


def write_registry(path: Path, alpha_active: int = 1) -> None:
    """alpha (two versions), beta, and a router over both; paths need not exist (validation is faked)."""
    def version(n: int, status: str) -> dict:
        return {"version": n, "path": f"a{n}", "status": status}

    data = {"format": 2, "active_router": "router", "adapters": {
        "alpha": {"kind": "task", "active_version": alpha_active,
                  "versions": [version(1, "active" if alpha_active == 1 else "retired"),
                               version(2, "active" if alpha_active == 2 else "retired")]},
        "beta": {"kind": "task", "active_version": 1, "versions": [version(1, "active")]},
        "router": {"kind": "router", "active_version": 1,
                   "versions": [{"version": 1, "path": "r", "status": "active", "labels": ["alpha", "beta"]}]},
    }}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    tmp.replace(path)


@pytest.fixture()
def state(tmp_path, monkeypatch) -> ServiceState:
    from service import adapters as adapters_module
    from service.adapter_validation import AdapterInfo

    def fake_validate(path, root, base, max_rank, names):
        return AdapterInfo(Path(root) / path, 8, 8.0, ("q_proj",), base.name, "", {})

    monkeypatch.setattr(adapters_module, "validate_adapter", fake_validate)
    settings = Settings(registry=tmp_path / "loras.json", adapter_root=tmp_path, max_queue=4)
    write_registry(settings.registry)
    engine = FakeEngine()
    base = BaseModelInfo("fake-base", tmp_path, "")
    manager = AdapterManager(settings, base, engine, Registry(settings.registry))
    asyncio.run(manager.sync(force=True))  # no watcher: each test syncs when it changes the registry
    st = ServiceState(settings=settings, base=base, engine=engine, adapters=manager, router=Router(engine),
                      metrics=Metrics(), admission=Admission(settings.max_queue),
                      build=BuildStatusReader(status_path(settings.registry)), ready=True)
    return st


def call(state: ServiceState, path: str, payload: dict) -> httpx.Response:
    app = create_app(state.settings, state=state)
    app.state.service = state  # the ASGI transport runs no lifespan

    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
            return await client.post(path, json=payload)

    return asyncio.run(go())


def gauge(state: ServiceState) -> float:
    text = state.metrics.render(state.engine.stats, state.admission.inflight, 0, 0).decode()
    return float(re.search(r"^loramux_queue_depth (\S+)$", text, re.MULTILINE).group(1))


def assert_all_given_back(state: ServiceState) -> None:
    assert state.admission.inflight == 0 and gauge(state) == 0
    assert not state.adapters._inflight, dict(state.adapters._inflight)  # no adapter still held


REQUESTS = [
    ("/generate", {"prompt": "hi", "adapter": "alpha", "max_tokens": 3}),
    ("/generate", {"prompt": "hi", "adapter": "alpha", "max_tokens": 3, "stream": True}),
    ("/generate", {"prompt": "hi", "max_tokens": 3}),
    ("/generate", {"prompt": "hi", "max_tokens": 3, "stream": True}),
    ("/v1/chat/completions", {"model": "alpha", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}),
    ("/v1/chat/completions", {"model": "auto", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3,
                              "stream": True}),
    ("/v1/chat/completions", {"model": "fake-base", "messages": [{"role": "user", "content": "hi"}],
                              "max_tokens": 3, "stream": True}),
]
IDS = [f"{path}-{'stream' if p.get('stream') else 'whole'}-{p.get('adapter') or p.get('model') or 'routed'}"
       for path, p in REQUESTS]


@pytest.mark.parametrize(("path", "payload"), REQUESTS, ids=IDS)
def test_normal_requests_give_back_slot_and_hold(state, path, payload):
    r = call(state, path, payload)
    assert r.status_code == 200, r.text
    assert "error" not in r.text
    assert_all_given_back(state)


@pytest.mark.parametrize(("path", "payload"), REQUESTS, ids=IDS)
def test_a_request_holds_its_slot_and_adapter_while_it_generates(state, path, payload):
    """A stream's generation runs after its handler has returned: the stream owns the slot then, and
    a slot given back when the handler returns would let every stream past the admission limit."""
    seen: list[tuple[int, int]] = []
    state.engine.probe = lambda: seen.append((state.admission.inflight, sum(state.adapters._inflight.values())))
    r = call(state, path, payload)
    assert r.status_code == 200, r.text
    routed_or_pinned = payload.get("adapter") or payload.get("model") != "fake-base"
    assert seen and all(slots == 1 and (holds >= 1 if routed_or_pinned else holds == 0) for slots, holds in seen), seen
    assert_all_given_back(state)


def boom(*_: Any, **__: Any) -> Any:
    raise RuntimeError("fault planted by the test")


FAULTS = {
    "headers": lambda mp: [mp.setattr(m, "route_headers", boom) for m in (generate_serving, openai_serving)],
    "response object": lambda mp: [mp.setattr(m, cls, boom) for m in (generate_serving, openai_serving)
                                   for cls in ("stream_response", "JSONResponse")],
    "prompt": lambda mp: [mp.setattr(m, "prompt_ids", boom) for m in (generate_serving, openai_serving)],
    "request id": lambda mp: [mp.setattr(m, "new_request_id", boom) for m in (generate_serving, openai_serving)],
}


@pytest.mark.parametrize("fault", sorted(FAULTS))
@pytest.mark.parametrize(("path", "payload"), REQUESTS, ids=IDS)
def test_a_fault_while_the_response_is_built_gives_everything_back(state, monkeypatch, fault, path, payload):
    FAULTS[fault](monkeypatch)
    r = call(state, path, payload)
    assert r.status_code == 500 and r.json()["error"]["type"] == "internal_error"
    assert_all_given_back(state)
    monkeypatch.undo()
    assert call(state, path, payload).status_code == 200  # and the server serves on
    assert_all_given_back(state)


@pytest.mark.parametrize(("path", "payload"), [rp for rp in REQUESTS if rp[1].get("stream")],
                         ids=[i for i, rp in zip(IDS, REQUESTS, strict=True) if rp[1].get("stream")])
def test_an_engine_fault_mid_stream_gives_everything_back(state, path, payload):
    state.engine.fail_mid_stream = True
    with contextlib.suppress(httpx.HTTPError):  # the response had started: it ends as the server ends it
        call(state, path, payload)
    assert_all_given_back(state)


def test_a_name_that_is_not_latin_1_cannot_break_a_header():
    class Named:
        name, version = "ünï日本", 1
        decision = router = None  # pinned: no routing decision

    headers = streaming.route_headers(Named())  # type: ignore[arg-type]
    for value in headers.values():
        value.encode("latin-1")
        assert value.isascii() and value.isprintable()


# ---- holds: from the choice to the end of the generation ---------------------------------------
def test_a_pinned_choice_holds_its_version_through_a_rollback(state):
    async def scenario() -> None:
        manager = state.adapters
        choice = await choose(state, [{"role": "user", "content": "hi"}], "alpha")
        assert choice.version == 1
        write_registry(state.settings.registry, alpha_active=2)  # switch alpha to v2 meanwhile
        await manager.sync()
        assert manager.active("alpha").version.version == 2  # new requests get v2 at once
        assert "alpha@1" in state.engine.resident  # but v1 stays: this request holds it
        deltas = [d async for d in generate_stream(state, "generate", "r1", [1], choice, SamplingParams(3), _outcome())]
        assert deltas[-1].finish_reason == "length"
        await asyncio.sleep(0.01)  # the unload runs as a task after the last release
        assert "alpha@1" not in state.engine.resident and "alpha@1" not in manager.loaded
        assert not manager._inflight

    asyncio.run(scenario())


def test_a_routed_choice_holds_its_version_and_the_router_holds_while_deciding(state):
    async def scenario() -> None:
        manager = state.adapters
        state.engine.score_gate = asyncio.Event()
        routing = asyncio.ensure_future(choose(state, [{"role": "user", "content": "hi"}], None))
        await asyncio.sleep(0.01)  # the router is mid-decision
        data = json.loads(state.settings.registry.read_text())
        data["adapters"]["router"]["versions"].append(
            {"version": 2, "path": "r2", "status": "active", "labels": ["alpha", "beta"]})
        data["adapters"]["router"]["versions"][0]["status"] = "retired"
        data["adapters"]["router"]["active_version"] = 2
        state.settings.registry.write_text(json.dumps(data))
        await manager.sync()  # a router swap lands during the decision
        assert "router@1" in state.engine.resident  # not unloaded under the forward pass
        state.engine.score_gate.set()
        choice = await routing
        assert choice.name == "alpha" and choice.router.version.version == 1
        await asyncio.sleep(0.01)
        assert "router@1" not in state.engine.resident  # gone once the decision was taken
        write_registry(state.settings.registry, alpha_active=2)
        await manager.sync()
        assert "alpha@1" in state.engine.resident  # held by the routed request until it generates
        deltas = [d async for d in generate_stream(state, "generate", "r2", [1], choice, SamplingParams(3), _outcome())]
        assert deltas[-1].finish_reason == "length"
        await asyncio.sleep(0.01)
        assert "alpha@1" not in state.engine.resident and not manager._inflight

    asyncio.run(scenario())


def test_a_choice_that_never_generates_still_lets_its_version_go(state):
    async def scenario() -> None:
        manager = state.adapters
        choice = await choose(state, [{"role": "user", "content": "hi"}], "alpha")
        write_registry(state.settings.registry, alpha_active=2)
        await manager.sync()
        assert "alpha@1" in state.engine.resident
        choice.release()
        choice.release()  # twice is harmless
        await asyncio.sleep(0.01)
        assert "alpha@1" not in state.engine.resident and not manager._inflight

    asyncio.run(scenario())


def _outcome():
    from service.inference import Outcome

    return Outcome()
