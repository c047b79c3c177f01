"""A classical routing baseline: TF-IDF features and a logistic regression (scikit-learn).

Why it is here: the comparison a user makes before adopting a LoRA router is "a small text
classifier in front of vLLM", which trains in seconds on a CPU and routes in microseconds. The
router report puts that classifier's figures, trained on the routing dataset's train split and
scored on the same examples as the router, next to the router's own, so the router has to earn
its place (and a dataset too easy or too noisy to tell them apart shows up at once).

The features are word 1-2-grams plus character 2-5-grams within word boundaries (robust to typos
and inflections in short commands), sublinear term frequency; the classifier is a multinomial
logistic regression with weak regularisation (C=10), whose probabilities give a confidence that
is scored for calibration (ECE) exactly like the router's.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from training.evaluate import metrics as m

NAME = "tfidf-logreg"


def tfidf_logreg(train: Sequence[tuple[str, str]], test: Sequence[tuple[str, str]], labels: Sequence[str],
                 bins: int = 10, c: float = 10.0, seed: int = 0) -> dict[str, Any]:
    """Fit on `train` (text, label) pairs, score on `test`: {"name", "accuracy", "macro_f1", "ece",
    "train_seconds", "examples", "train_examples", "predictions"}. Macro-F1 is over `labels`, as in
    the router report. Raises ValueError when `train` has fewer than two labels or `test` is empty."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline, make_union

    train_labels = {label for _, label in train}
    if len(train_labels) < 2:
        raise ValueError(f"the baseline needs at least two labels in its training data, got {sorted(train_labels)}")
    if not test:
        raise ValueError("no test examples for the baseline")
    features = make_union(
        TfidfVectorizer(analyzer="word", ngram_range=(1, 2), sublinear_tf=True, lowercase=True),
        TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 5), sublinear_tf=True, lowercase=True),
    )
    model = make_pipeline(features, LogisticRegression(C=c, max_iter=2000, random_state=seed))
    started = time.perf_counter()
    model.fit([text for text, _ in train], [label for _, label in train])
    train_seconds = time.perf_counter() - started

    texts = [text for text, _ in test]
    gold = [label for _, label in test]
    probabilities = model.predict_proba(texts)
    classes = [str(x) for x in model.classes_]
    best = probabilities.argmax(axis=1)
    predicted = [classes[i] for i in best]
    confidences = [float(probabilities[row, i]) for row, i in enumerate(best)]
    correct = [p == g for p, g in zip(predicted, gold, strict=True)]
    return {
        "name": NAME,
        "accuracy": m.accuracy(gold, predicted),
        "macro_f1": m.macro_f1(m.per_class(gold, predicted, list(labels))),
        "ece": m.expected_calibration_error(confidences, correct, bins)["ece"],
        "train_seconds": round(train_seconds, 3),
        "examples": len(test),
        "train_examples": len(train),
        "predictions": predicted,
    }
