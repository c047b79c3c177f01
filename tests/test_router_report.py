"""The router report's additions, without a model: the threshold curve, the TF-IDF baseline, the
PNGs, concurrent decisions with progress, and the calibration temperature (through a fake engine
that scores candidates from keywords)."""

from __future__ import annotations

import asyncio
import json
import logging
import random
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from service.engine.base import TokenDelta
from training.data.chats import write_jsonl
from training.evaluate import metrics as m
from training.evaluate.baseline import tfidf_logreg
from training.evaluate.reports import report_text, write_report
from training.evaluate.router_and_experts import EngineSession, evaluate_router_async
from training.progress import gather_limited

LABELS = ["lights", "media", "weather"]
WORDS = {
    "lights": (["turn on", "switch off", "dim", "brighten"], ["lamp", "ceiling light", "bulbs", "spotlights"]),
    "media": (["play", "pause", "skip", "resume"], ["the song", "my playlist", "the podcast", "the album"]),
    "weather": (["will it", "is it going to", "forecast says it will", "does it"], ["rain", "snow", "be sunny",
                                                                                    "be windy"]),
}
PLACES = ["", " in the kitchen", " in the office", " tomorrow", " tonight", " please"]


def synthetic(n_per_label: int, seed: int) -> list[tuple[str, str]]:
    """Separable (text, label) pairs: each label has its own verbs and objects."""
    rng = random.Random(seed)
    out = []
    for label, (verbs, objects) in WORDS.items():
        for _ in range(n_per_label):
            out.append((f"{rng.choice(verbs)} {rng.choice(objects)}{rng.choice(PLACES)}", label))
    rng.shuffle(out)
    return out


# ---- threshold curve -------------------------------------------------------------------------

def test_threshold_curve_by_hand() -> None:
    confidences = [0.99, 0.9, 0.6, 0.3]
    correct = [True, True, False, False]
    curve = m.threshold_curve(confidences, correct, [0.0, 0.5, 0.6, 0.95, 0.99, 1.0])
    assert curve == [
        {"threshold": 0.0, "coverage": 1.0, "accuracy": 0.5},
        {"threshold": 0.5, "coverage": 0.75, "accuracy": pytest.approx(2 / 3)},
        {"threshold": 0.6, "coverage": 0.75, "accuracy": pytest.approx(2 / 3)},  # >=: 0.6 itself is routed
        {"threshold": 0.95, "coverage": 0.25, "accuracy": 1.0},
        {"threshold": 0.99, "coverage": 0.25, "accuracy": 1.0},
        {"threshold": 1.0, "coverage": 0.0, "accuracy": None},  # nothing routed: no accuracy
    ]
    assert m.THRESHOLDS[:3] == (0.0, 0.05, 0.1) and m.THRESHOLDS[-2:] == (0.95, 0.99) and len(m.THRESHOLDS) == 21
    assert [p["threshold"] for p in m.threshold_curve([], [])] == list(m.THRESHOLDS)


# ---- baseline --------------------------------------------------------------------------------

def test_baseline_separates_a_separable_dataset() -> None:
    result = tfidf_logreg(synthetic(20, seed=1), synthetic(10, seed=2), LABELS)
    assert result["name"] == "tfidf-logreg"
    assert result["accuracy"] == 1.0 and result["macro_f1"] == 1.0
    assert result["examples"] == 30 and result["train_examples"] == 60
    assert result["train_seconds"] > 0.0  # it was timed: fitting the baseline takes some time
    # every answer right: each bin's gap is 1 - its mean confidence, so the ECE is 1 - the mean
    # confidence however the confidences are binned; one bin or ten must agree, and it cannot be 0
    one_bin = tfidf_logreg(synthetic(20, seed=1), synthetic(10, seed=2), LABELS, bins=1)["ece"]
    assert result["ece"] == pytest.approx(one_bin, abs=1e-9) and 0.0 < one_bin < 1 - 1 / len(LABELS)
    json.dumps({k: v for k, v in result.items()})  # plain numbers: the report is JSON


def test_baseline_on_shuffled_labels_is_near_chance() -> None:
    train = synthetic(20, seed=1)
    labels = [label for _, label in train]
    random.Random(0).shuffle(labels)
    shuffled = [(text, label) for (text, _), label in zip(train, labels, strict=True)]
    result = tfidf_logreg(shuffled, synthetic(20, seed=2), LABELS)
    assert result["accuracy"] < 0.7


def test_baseline_refuses_a_single_label() -> None:
    with pytest.raises(ValueError):
        tfidf_logreg([("turn on the lamp", "lights")] * 3, [("play", "media")], LABELS)


# ---- concurrency and progress ----------------------------------------------------------------

def test_gather_limited_keeps_order_bounds_concurrency_and_logs(caplog: pytest.LogCaptureFixture) -> None:
    state = {"now": 0, "peak": 0}

    async def job(i: int) -> int:
        state["now"] += 1
        state["peak"] = max(state["peak"], state["now"])
        await asyncio.sleep(0.001 * ((i * 7) % 5))  # finish out of order
        state["now"] -= 1
        return i

    with caplog.at_level(logging.INFO, logger="training.progress"):
        out = asyncio.run(gather_limited([lambda i=i: job(i) for i in range(40)], 4, "jobs", bar=False))
    assert out == list(range(40))
    assert state["peak"] == 4
    lines = [r.getMessage() for r in caplog.records if r.name == "training.progress"]
    assert len(lines) == 10 and lines[0].startswith("jobs: 4/40 (10%)") and lines[-1].startswith("jobs: 40/40")


# ---- the router evaluation through a fake engine ---------------------------------------------

class FakeTokenizer:
    """Characters as tokens; a chat template of role/content markers (1, 2, 3 = end of turn)."""

    eos_token_id = 3

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [ord(c) + 10 for c in text]

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(chr(i - 10) for i in ids if i >= 10)

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = False,
                            tokenize: bool = True, return_dict: bool = False) -> list[int]:
        ids: list[int] = []
        for message in messages:
            ids += [1, *self.encode(message["role"]), 2, *self.encode(str(message["content"])), 3]
        if add_generation_prompt:
            ids += [1, *self.encode("assistant"), 2]
        return ids


class FakeEngine:
    """Scores the candidate whose keywords are in the request 0 and the others -2 (-0.5 and the
    wrong candidate when the request says "maybe"), after a delay that varies per request."""

    def __init__(self) -> None:
        self.tokenizer = FakeTokenizer()
        self.in_flight = 0
        self.peak = 0
        self.image_sizes = None  # text only: no image expands in the router's prompt

    async def add_adapter(self, ref: Any) -> None:
        pass

    def _label(self, prompt_ids: Sequence[int]) -> tuple[str, bool]:
        text = self.tokenizer.decode(prompt_ids)
        user = text.split("user")[-1]
        label = next(lb for lb, (verbs, objects) in WORDS.items() if any(o in user for o in objects))
        return label, "maybe" in user

    async def sequence_logprobs(self, prompt_ids: Sequence[int], adapter: Any, continuations: Sequence[Sequence[int]],
                                images: Sequence[Any] = (), prefix_len: int = 0) -> list[float]:
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        await asyncio.sleep(0.001 * (len(prompt_ids) % 5))
        self.in_flight -= 1
        label, unsure = self._label(prompt_ids)
        if unsure:
            label = LABELS[(LABELS.index(label) + 1) % len(LABELS)]
        names = [self.tokenizer.decode(c[:-1]) for c in continuations]
        return [0.0 if name == label else (-0.5 if unsure else -2.0) for name in names]

    async def generate(self, request_id: str, prompt: list[int], ref: Any, params: Any,
                       images: Sequence[Any] = ()) -> AsyncIterator[TokenDelta]:
        await asyncio.sleep(0)
        yield TokenDelta(self._label(prompt)[0], 1, "stop")


def _chat(text: str, label: str) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": text}, {"role": "assistant", "content": label}]}


@pytest.fixture(scope="module")
def router_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("router")
    (folder / "adapter_config.json").write_text(json.dumps({"r": 4}))
    (folder / "loramux.json").write_text(json.dumps({"kind": "router", "labels": LABELS,
                                                     "calibration": {"temperature": 2.0}}))
    return folder


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("routing")
    write_jsonl(folder / "train.jsonl", [_chat(t, lb) for t, lb in synthetic(20, seed=1)])
    unsure = [(f"maybe {t}", lb) for t, lb in synthetic(1, seed=3)]  # 3 the fake router gets wrong
    write_jsonl(folder / "eval.jsonl", [_chat(t, lb) for t, lb in synthetic(9, seed=2) + unsure])
    return folder


def _evaluate(router_dir: Path, dataset: Path, engine: FakeEngine) -> dict[str, Any]:
    async def run() -> dict[str, Any]:
        async with EngineSession(SimpleNamespace(), SimpleNamespace(), engine) as session:
            return (await evaluate_router_async(session, router_dir, dataset)).report

    return asyncio.run(run())


@pytest.fixture(scope="module")
def report(router_dir: Path, dataset_dir: Path) -> dict[str, Any]:
    engine = FakeEngine()
    result = _evaluate(router_dir, dataset_dir, engine)
    result["_peak"] = engine.peak
    return result


def test_router_report_applies_the_temperature_and_keeps_order(report: dict[str, Any]) -> None:
    assert report["examples"] == 30 and report["labels"] == LABELS
    assert report["accuracy"] == pytest.approx(27 / 30)  # decisions matched to their own examples
    assert 1 < report["_peak"] <= 16  # concurrent, bounded
    assert report["calibration"]["temperature"] == 2.0
    sure = 1 / (1 + 2 * 2.718281828459045 ** (-2 / 2.0))  # softmax([0, -2, -2] / T=2)
    unsure = 1 / (1 + 2 * 2.718281828459045 ** (-0.5 / 2.0))
    assert report["calibration"]["mean_confidence"] == pytest.approx((27 * sure + 3 * unsure) / 30)
    curve = {p["threshold"]: p for p in report["threshold_curve"]}
    assert curve[0.0] == {"threshold": 0.0, "coverage": 1.0, "accuracy": pytest.approx(0.9)}
    assert curve[0.5] == {"threshold": 0.5, "coverage": pytest.approx(0.9), "accuracy": 1.0}  # unsure ones cut
    assert curve[0.99]["coverage"] == 0.0 and curve[0.99]["accuracy"] is None


def test_router_report_has_the_baseline(report: dict[str, Any]) -> None:
    baseline = report["baseline"]
    assert set(baseline) == {"name", "accuracy", "macro_f1", "ece", "train_seconds", "examples", "train_examples"}
    assert baseline["name"] == "tfidf-logreg" and baseline["examples"] == 30 and baseline["train_examples"] == 60
    assert baseline["accuracy"] == 1.0  # the "maybe" prefix does not fool a keyword classifier
    text = report_text(report)
    assert "router vs baseline: accuracy 90.0% vs 100.0%" in text
    assert "macro F1" in text and "ECE" in text and "recall" in text and "coverage" in text


def test_no_baseline_without_a_train_split(router_dir: Path, tmp_path: Path) -> None:
    chats = tmp_path / "chats.jsonl"
    write_jsonl(chats, [_chat(t, lb) for t, lb in synthetic(10, seed=4)])
    report = _evaluate(router_dir, chats, FakeEngine())
    assert report["baseline"] is None
    assert "no baseline" in report_text(report)


def test_write_report_pngs(report: dict[str, Any], tmp_path: Path) -> None:
    from PIL import Image

    paths = write_report(report, tmp_path / "out")
    assert set(paths) == {"json", "png", "reliability", "threshold_curve"}
    for key in ("png", "reliability", "threshold_curve"):
        with Image.open(paths[key]) as image:
            assert image.format == "PNG" and image.size[0] > 100
            image.verify()
    assert paths["reliability"].name == "reliability.png" and paths["threshold_curve"].name == "threshold_curve.png"
    saved = json.loads(paths["json"].read_text())
    assert saved["baseline"]["name"] == "tfidf-logreg" and len(saved["threshold_curve"]) == 21
