"""`POST /route` on a live server decides exactly what `loramux eval` reports for the same router.

Both go through `Router.decide` on the same engine code, but through different doors (HTTP with the
registry's label order and the router's prefix cache, versus the evaluation session), so this is
where a drift between training-time and serving-time prompts, label order or scoring would show:
the confusion matrix from the served decisions must equal the evaluation report's, cell by cell,
and every misrouted example must carry the same confidence.
"""

from __future__ import annotations

import math
from pathlib import Path

import httpx
import pytest

from service.settings import Settings
from tests.conftest import CACHE_DIR, TASK_ADAPTERS
from training.data.chats import read_chats, write_jsonl
from training.data.routing_dataset import build_routing_dataset
from training.data.sources import hass
from training.evaluate import metrics
from training.evaluate.router_and_experts import evaluate_router, router_gold

EXPERT_OF = dict(zip(TASK_ADAPTERS, ("lights", "media", "timer"), strict=True))


@pytest.fixture(scope="module")
def routing_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A routing dataset over the served adapters' names, from real home-assistant utterances."""
    out = tmp_path_factory.mktemp("route_vs_eval")
    intents = hass.load_intents()
    files = {}
    for name, expert in EXPERT_OF.items():
        files[name] = out / f"{name}.jsonl"
        records = hass.expert_records(hass.EXPERTS[expert], 40, seed=3, intents=intents)
        for record in records:  # served under the test adapters' names
            record["metadata"]["adapter"] = name
        write_jsonl(files[name], records)
    return build_routing_dataset(files, out / "routing", seed=0).path


def test_route_decisions_equal_the_evaluation_report(server, served_registry: Path, adapter_root: Path,
                                                     routing_dir: Path) -> None:
    settings = Settings(registry=served_registry, adapter_root=adapter_root, cache_dir=CACHE_DIR)
    report = evaluate_router(adapter_root / "router", routing_dir, settings, labels=list(TASK_ADAPTERS)).report
    records = read_chats(routing_dir / "eval.jsonl")
    gold, predicted, confidence = [], [], {}
    with httpx.Client(base_url=server.url, timeout=60) as client:
        for record in records:
            body = client.post("/route", json={"messages": [{"role": "user", "content": record.user_text}]}).json()
            probabilities = {c["adapter"]: c["probability"] for c in body["candidates"]}
            assert set(probabilities) == set(TASK_ADAPTERS)
            assert math.isclose(sum(probabilities.values()), 1.0, abs_tol=1e-6)
            assert body["adapter"] == max(probabilities, key=probabilities.__getitem__) and not body["fallback"]
            gold.append(router_gold(record))
            predicted.append(body["adapter"])
            confidence[record.user_text] = body["confidence"]
    assert len(records) == report["examples"] >= 10
    assert metrics.confusion_matrix(gold, predicted, list(TASK_ADAPTERS)) == report["confusion"]
    assert metrics.accuracy(gold, predicted) == report["accuracy"]
    for error in report["errors"]:
        assert math.isclose(confidence[error["text"]], error["confidence"], abs_tol=2e-3), error
