"""Evaluation arithmetic, kept free of models and I/O so it can be checked by hand.

Conventions: the confusion matrix has one row per gold label and one column per predicted label
(plus an `<invalid>` column when a prediction is not a label); precision of a label that was
never predicted is 0, and so is F1 when precision + recall is 0. Expected calibration error uses
`bins` equal-width confidence bins, (lo, hi] with the first bin also taking 0, and weighs each
bin's |accuracy - mean confidence| by its share of the examples.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

INVALID = "<invalid>"


def accuracy(gold: Sequence[str], predicted: Sequence[str]) -> float:
    _same_length(gold, predicted)
    if not gold:
        return 0.0
    return sum(g == p for g, p in zip(gold, predicted, strict=True)) / len(gold)


def confusion_matrix(gold: Sequence[str], predicted: Sequence[str], labels: Sequence[str]) -> dict[str, Any]:
    """{"labels": rows, "columns": cols, "matrix": counts[row][col]}; unknown predictions go to `<invalid>`."""
    _same_length(gold, predicted)
    rows = list(labels)
    extra_gold = sorted({g for g in gold if g not in rows})
    rows += extra_gold
    columns = list(rows)
    if any(p not in rows for p in predicted):
        columns.append(INVALID)
    index_r = {label: i for i, label in enumerate(rows)}
    index_c = {label: i for i, label in enumerate(columns)}
    matrix = [[0] * len(columns) for _ in rows]
    for g, p in zip(gold, predicted, strict=True):
        matrix[index_r[g]][index_c[p if p in index_c else INVALID]] += 1
    return {"labels": rows, "columns": columns, "matrix": matrix}


def per_class(gold: Sequence[str], predicted: Sequence[str], labels: Sequence[str]) -> dict[str, dict[str, float]]:
    _same_length(gold, predicted)
    out: dict[str, dict[str, float]] = {}
    for label in labels:
        tp = sum(g == label and p == label for g, p in zip(gold, predicted, strict=True))
        predicted_n = sum(p == label for p in predicted)
        support = sum(g == label for g in gold)
        precision = tp / predicted_n if predicted_n else 0.0
        recall = tp / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        out[label] = {"precision": precision, "recall": recall, "f1": f1, "support": support}
    return out


def macro_f1(report: Mapping[str, Mapping[str, float]]) -> float:
    scored = [v["f1"] for v in report.values() if v["support"] > 0]
    return sum(scored) / len(scored) if scored else 0.0


def invalid_rate(predicted: Sequence[str], labels: Sequence[str]) -> float:
    allowed = set(labels)
    return sum(p not in allowed for p in predicted) / len(predicted) if predicted else 0.0


def expected_calibration_error(confidences: Sequence[float], correct: Sequence[bool], bins: int = 10
                               ) -> dict[str, Any]:
    """ECE and its reliability table: per bin, count, mean confidence and accuracy."""
    _same_length(confidences, correct)
    if bins < 1:
        raise ValueError("bins must be >= 1")
    table = []
    total = len(confidences)
    ece = 0.0
    for b in range(bins):
        lo, hi = b / bins, (b + 1) / bins
        members = [i for i, c in enumerate(confidences) if (lo < c <= hi) or (b == 0 and c == 0.0)]
        if not members:
            table.append({"bin": [lo, hi], "count": 0, "confidence": None, "accuracy": None})
            continue
        conf = sum(confidences[i] for i in members) / len(members)
        acc = sum(bool(correct[i]) for i in members) / len(members)
        ece += len(members) / total * abs(acc - conf)
        table.append({"bin": [lo, hi], "count": len(members), "confidence": conf, "accuracy": acc})
    return {"ece": ece if total else 0.0, "bins": table}


def brier_score(probabilities: Sequence[Mapping[str, float]], gold: Sequence[str]) -> float:
    """Mean over examples of sum over labels of (p - 1[label is gold])^2."""
    _same_length(probabilities, gold)
    if not gold:
        return 0.0
    total = 0.0
    for probs, g in zip(probabilities, gold, strict=True):
        total += sum((p - (1.0 if label == g else 0.0)) ** 2 for label, p in probs.items())
        if g not in probs:
            total += 1.0
    return total / len(gold)


def rate(flags: Sequence[bool]) -> float:
    return sum(bool(f) for f in flags) / len(flags) if flags else 0.0


def _same_length(a: Sequence[Any], b: Sequence[Any]) -> None:
    if len(a) != len(b):
        raise ValueError(f"length mismatch: {len(a)} vs {len(b)}")
