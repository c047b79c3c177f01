"""The router's training plan follows the data, and temperature scaling calibrates it (no model)."""

from __future__ import annotations

import math
import random

import pytest

from training.train.calibration import calibrate, confidences, ece, fit_temperature
from training.train.schedule import ROUTER, plan_training
from training.train.validation import ValidationResult


def test_training_defaults_change_with_the_dataset_size() -> None:
    small = plan_training(350, batch_size=16)  # ~50 examples x 7 intents
    demo = plan_training(1920, batch_size=16)  # the demo's 6 experts x 320
    tiny = plan_training(40, batch_size=16)
    assert small.steps_per_epoch == 22 and small.max_steps == 22 * 8  # eight passes over small data
    assert small.epochs == pytest.approx(8.0)
    assert demo.max_steps == ROUTER.max_steps < 8 * demo.steps_per_epoch  # capped: fewer passes on big data
    assert demo.epochs < small.epochs
    assert tiny.max_steps == ROUTER.min_steps  # a floor of optimizer steps, however small the data
    for plan in (small, demo, tiny):
        assert plan.eval_every == min(max(5, plan.steps_per_epoch), plan.max_steps) and plan.patience == 3
        assert str(plan.max_steps) in plan.why
    assert plan_training(350, 16, epochs=2).max_steps == 44  # explicit options win
    assert plan_training(350, 16, max_steps=7).max_steps == 7
    assert plan_training(350, 16, can_validate=False).eval_every == 0
    assert plan_training(350, 16, kind="task").patience == 0


def overconfident(n: int = 400, accuracy: float = 0.8, margin: float = 12.0, seed: int = 0
                  ) -> tuple[list[list[float]], list[int]]:
    """Scores of a router that is right `accuracy` of the time and always sure (margin 12 nats)."""
    rng = random.Random(seed)
    scores, gold = [], []
    for _ in range(n):
        g = rng.randrange(4)
        top = g if rng.random() < accuracy else (g + 1 + rng.randrange(3)) % 4
        row = [rng.gauss(-margin, 1.0) for _ in range(4)]
        row[top] = rng.gauss(0.0, 1.0)
        scores.append(row)
        gold.append(g)
    return scores, gold


def test_fitted_temperature_lowers_the_ece_of_an_overconfident_router() -> None:
    scores, gold = overconfident()
    before = ece(scores, gold, 1.0)
    assert before > 0.15  # says ~1.0, is right 80% of the time
    result = calibrate(scores, gold)
    assert result["temperature"] > 2.0
    assert result["val_ece_after"] < 0.05 < before
    assert result["val_nll_after"] < result["val_nll_before"]
    # on fresh examples of the same router the fitted temperature still helps
    fresh, fresh_gold = overconfident(seed=1)
    assert ece(fresh, fresh_gold, result["temperature"]) < 0.06 < ece(fresh, fresh_gold, 1.0)
    # and it never changes a decision
    assert [c for c, _ in confidences(scores, result["temperature"])] == [c for c, _ in confidences(scores, 1.0)]


def test_fitted_temperature_minimises_the_nll() -> None:
    scores, gold = overconfident(n=200, accuracy=0.9, margin=5.0, seed=3)
    from training.train.calibration import nll

    best = fit_temperature(scores, gold)
    for other in (best * 0.8, best * 1.25):
        assert nll(scores, gold, best) <= nll(scores, gold, other)
    assert fit_temperature([], []) == 1.0
    assert math.isfinite(best)


def test_a_flawless_validation_split_does_not_buy_certainty() -> None:
    """All 40 right: the plain NLL would drive T to 0 (confidence 1.0); the fit stops at Laplace's
    (n + 1) / (n + 2) = 0.976 instead."""
    rng = random.Random(5)
    scores = [[rng.gauss(-6, 1) if i else rng.gauss(0, 1) for i in range(5)] for _ in range(40)]
    gold = [0] * 40
    result = calibrate(scores, gold)
    mean = sum(c for _, c in confidences(scores, result["temperature"])) / 40
    assert result["temperature"] > 0.5
    assert mean == pytest.approx(41 / 42, abs=1e-3)


def test_best_validation_prefers_accuracy_then_clearly_lower_nll() -> None:
    a = ValidationResult(10, 0.9, 0.30, [])
    assert ValidationResult(20, 0.95, 0.50, []).better_than(a)
    assert ValidationResult(20, 0.9, 0.20, []).better_than(a)
    assert not ValidationResult(20, 0.9, 0.29, []).better_than(a)  # 3% lower nll is noise
    assert not ValidationResult(20, 0.85, 0.01, []).better_than(a)
    assert a.better_than(None)
