"""Evaluation arithmetic, kept free of models and I/O so it can be checked by hand.

Conventions: the confusion matrix has one row per gold label and one column per predicted label
(plus an `<invalid>` column when a prediction is not a label); precision of a label that was
never predicted is 0, and so is F1 when precision + recall is 0. Expected calibration error uses
`bins` equal-width confidence bins, (lo, hi] with the first bin also taking 0, and weighs each
bin's |accuracy - mean confidence| by its share of the examples. The threshold curve counts an
example as routed (not sent to the fallback) when its confidence is >= the threshold, as
`Router.decide` does with `LORAMUX_ROUTE_THRESHOLD`.

Counting is left to scikit-learn (`accuracy_score`, `confusion_matrix`,
`precision_recall_fscore_support`); the functions here fix the conventions above around it and
return plain Python numbers, so reports stay JSON.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from sklearn import metrics as skm

INVALID = "<invalid>"


def accuracy(gold: Sequence[str], predicted: Sequence[str]) -> float:
    _same_length(gold, predicted)
    if not gold:
        return 0.0
    return float(skm.accuracy_score(list(gold), list(predicted)))


def confusion_matrix(gold: Sequence[str], predicted: Sequence[str], labels: Sequence[str]) -> dict[str, Any]:
    """{"labels": rows, "columns": cols, "matrix": counts[row][col]}; unknown predictions go to `<invalid>`."""
    _same_length(gold, predicted)
    rows = list(labels)
    extra_gold = sorted({g for g in gold if g not in rows})
    rows += extra_gold
    columns = list(rows)
    if any(p not in rows for p in predicted):
        columns.append(INVALID)
    known = set(rows)
    mapped = [p if p in known else INVALID for p in predicted]
    if not gold:
        return {"labels": rows, "columns": columns, "matrix": [[0] * len(columns) for _ in rows]}
    square = skm.confusion_matrix(list(gold), mapped, labels=columns)  # columns x columns; the <invalid> row is 0
    matrix = [[int(v) for v in square[i]] for i in range(len(rows))]
    return {"labels": rows, "columns": columns, "matrix": matrix}


def per_class(gold: Sequence[str], predicted: Sequence[str], labels: Sequence[str]) -> dict[str, dict[str, float]]:
    """Precision, recall, F1 and support of each label (0 where undefined: never predicted, no gold)."""
    _same_length(gold, predicted)
    labels = list(labels)
    if not gold or not labels:
        return {label: {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0} for label in labels}
    precision, recall, f1, support = skm.precision_recall_fscore_support(
        list(gold), list(predicted), labels=labels, average=None, zero_division=0)
    return {
        label: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(n)}
        for label, p, r, f, n in zip(labels, precision, recall, f1, support, strict=True)
    }


def macro_f1(report: Mapping[str, Mapping[str, float]]) -> float:
    """Mean F1 over the labels that have gold examples (a `per_class` report)."""
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


THRESHOLDS = (*(round(0.05 * i, 2) for i in range(20)), 0.99)  # 0.0, 0.05, ..., 0.95, 0.99


def threshold_curve(confidences: Sequence[float], correct: Sequence[bool],
                    thresholds: Sequence[float] = THRESHOLDS) -> list[dict[str, Any]]:
    """What `LORAMUX_ROUTE_THRESHOLD` trades: per threshold, the share of examples routed
    (confidence >= threshold; the others go to the fallback) and the accuracy among them
    (None when none is routed)."""
    _same_length(confidences, correct)
    total = len(confidences)
    out = []
    for t in thresholds:
        kept = [bool(ok) for c, ok in zip(confidences, correct, strict=True) if c >= t]
        out.append({
            "threshold": float(t),
            "coverage": len(kept) / total if total else 0.0,
            "accuracy": sum(kept) / len(kept) if kept else None,
        })
    return out


def rate(flags: Sequence[bool]) -> float:
    return sum(bool(f) for f in flags) / len(flags) if flags else 0.0


def _same_length(a: Sequence[Any], b: Sequence[Any]) -> None:
    if len(a) != len(b):
        raise ValueError(f"length mismatch: {len(a)} vs {len(b)}")
