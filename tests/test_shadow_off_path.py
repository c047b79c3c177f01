"""Shadow routing never touches the request it samples (issue 13, item 7): its latency and its
failures stay off the request path.

In process, on the real adapter manager and router with the small fake engine of
`tests.test_ticket_release` (the shadow's scheduling is logic around the engine): a candidate
router whose scoring blocks, then one whose scoring raises. The request's decision comes back at
once and from the active router either way; the comparison is counted when it completes, and a
failure is counted as one, with the candidate's hold released.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from service.inference import route
from service.state import ServiceState
from tests.test_ticket_release import state  # noqa: F401 (the fixture)

MESSAGES = [{"role": "user", "content": "hello"}]


def add_candidate(st: ServiceState) -> None:
    data = json.loads(st.settings.registry.read_text())
    data["adapters"]["router"]["versions"].append({"version": 2, "path": "r2", "status": "candidate",
                                                   "labels": ["alpha", "beta"]})
    st.settings.registry.write_text(json.dumps(data))
    asyncio.run(st.adapters.sync(force=True))


class CandidateScoring:
    """Wraps the fake engine's scoring: the candidate (router@2) blocks on `gate`, or raises."""

    def __init__(self, engine: Any, fail: bool = False):
        self.inner, self.fail = engine.sequence_logprobs, fail
        self.gate = asyncio.Event()

    async def __call__(self, prompt_ids: Any, adapter: Any, continuations: Any, *args: Any, **kwargs: Any) -> Any:
        if adapter is not None and adapter.key.endswith("@2"):
            if self.fail:
                raise RuntimeError("candidate router broke")
            await self.gate.wait()
        return await self.inner(prompt_ids, adapter, continuations, *args, **kwargs)


@pytest.fixture()
def shadowed(state: ServiceState) -> ServiceState:  # noqa: F811
    state.settings = state.settings.model_copy(update={"shadow_fraction": 1.0})
    add_candidate(state)
    assert state.adapters.candidate_router() is not None
    return state


def test_a_slow_candidate_does_not_delay_the_request(shadowed: ServiceState) -> None:
    scoring = CandidateScoring(shadowed.engine)
    shadowed.engine.sequence_logprobs = scoring  # type: ignore[method-assign]

    async def scenario() -> tuple[Any, dict]:
        choice = await asyncio.wait_for(route(shadowed, MESSAGES), timeout=5)  # the candidate is blocked
        before = dict(shadowed.shadow_stats)
        choice.release()
        scoring.gate.set()
        await asyncio.gather(*shadowed.shadow_tasks)
        return choice, before

    choice, before = asyncio.run(scenario())
    assert choice.router is not None and choice.router.version.version == 1  # the active router decided
    assert before == {}  # not compared yet when the request got its answer
    (stats,) = shadowed.shadow_stats.values()
    assert stats["compared"] == 1
    assert not shadowed.adapters._inflight  # every hold given back


def test_a_failing_candidate_never_fails_the_request(shadowed: ServiceState) -> None:
    shadowed.engine.sequence_logprobs = CandidateScoring(shadowed.engine, fail=True)  # type: ignore[method-assign]

    async def scenario() -> Any:
        choice = await route(shadowed, MESSAGES)
        choice.release()
        await asyncio.gather(*shadowed.shadow_tasks)
        return choice

    choice = asyncio.run(scenario())
    assert choice.adapter is not None and choice.adapter.version.name == "alpha"  # the active router's pick
    assert shadowed.metrics.registry.get_sample_value("loramux_shadow_routing_failures_total") == 1
    assert shadowed.shadow_stats == {}
    assert not shadowed.adapters._inflight
