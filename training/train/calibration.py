"""Temperature scaling for the router's confidence (Guo et al., 2017).

A LoRA trained to near-zero loss on a few hundred examples is over-confident: it says 0.999 where it
is right nine times in ten, and then `LORAMUX_ROUTE_THRESHOLD` means nothing. One scalar `T`,
fitted on the validation split at the end of training by minimising the negative log-likelihood of
`softmax(scores / T)`, fixes most of that without changing a single decision (dividing every score
by the same positive number keeps their order). It is stored with the router (`loramux.json`,
then the registry) and applied when serving.

A validation split the router gets entirely right has no finite NLL minimiser: the likelihood only
grows as T shrinks towards 0, and the fitted router would then claim certainty that a few dozen
examples cannot support. So the fitted temperature is never one whose mean confidence exceeds
Laplace's estimate of the accuracy, (correct + 1) / (n + 2) (the rule of succession: after n
successes in n trials the next is a success with probability (n + 1) / (n + 2)); with errors in
the split the NLL minimiser is usually below that ceiling already, and with hundreds of examples
the ceiling hardly matters.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from training.evaluate import metrics as m

MIN_T, MAX_T = 0.05, 20.0


def nll(scores: Sequence[Sequence[float]], gold: Sequence[int], temperature: float) -> float:
    """Mean negative log-likelihood of the gold candidates under softmax(scores / temperature)."""
    total = 0.0
    for row, g in zip(scores, gold, strict=True):
        scaled = [s / temperature for s in row]
        peak = max(scaled)
        log_z = peak + math.log(sum(math.exp(s - peak) for s in scaled))
        total += log_z - scaled[g]
    return total / max(1, len(gold))


def _golden(f: Callable[[float], float], lo: float, hi: float, steps: int = 60) -> float:
    """Minimiser of a unimodal `f` on [lo, hi] by golden-section search."""
    ratio = (math.sqrt(5) - 1) / 2
    a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    fa, fb = f(a), f(b)
    for _ in range(steps):
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - ratio * (hi - lo)
            fa = f(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + ratio * (hi - lo)
            fb = f(b)
    return (lo + hi) / 2


def mean_confidence(scores: Sequence[Sequence[float]], temperature: float) -> float:
    chosen = confidences(scores, temperature)
    return sum(c for _, c in chosen) / max(1, len(chosen))


def fit_temperature(scores: Sequence[Sequence[float]], gold: Sequence[int]) -> float:
    """The temperature in [MIN_T, MAX_T] that minimises the validation NLL (golden-section search on
    log T; the NLL is convex in 1/T, so unimodal there), raised if need be until the mean confidence
    is no more than Laplace's accuracy estimate (see the module docstring). 1.0 with no data."""
    if not gold:
        return 1.0
    log_t = _golden(lambda x: nll(scores, gold, math.exp(x)), math.log(MIN_T), math.log(MAX_T))
    correct = sum(max(range(len(row)), key=row.__getitem__) == g for row, g in zip(scores, gold, strict=True))
    ceiling = (correct + 1) / (len(gold) + 2)
    if mean_confidence(scores, math.exp(log_t)) > ceiling:  # confidence falls as T grows: bisect for it
        lo, hi = log_t, math.log(MAX_T)
        for _ in range(60):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if mean_confidence(scores, math.exp(mid)) > ceiling else (lo, mid)
        log_t = hi
    return round(math.exp(log_t), 4)


def confidences(scores: Sequence[Sequence[float]], temperature: float) -> list[tuple[int, float]]:
    """(chosen candidate, its probability) per example under the given temperature."""
    out = []
    for row in scores:
        scaled = [s / temperature for s in row]
        peak = max(scaled)
        exps = [math.exp(s - peak) for s in scaled]
        best = max(range(len(row)), key=lambda i: row[i])
        out.append((best, exps[best] / sum(exps)))
    return out


def ece(scores: Sequence[Sequence[float]], gold: Sequence[int], temperature: float, bins: int = 10) -> float:
    chosen = confidences(scores, temperature)
    return float(m.expected_calibration_error([c for _, c in chosen], [i == g for (i, _), g in
                                                                       zip(chosen, gold, strict=True)], bins)["ece"])


def calibrate(scores: Sequence[Sequence[float]], gold: Sequence[int]) -> dict[str, float]:
    """Fit the temperature and report what it did to the validation split's ECE and NLL."""
    temperature = fit_temperature(scores, gold)
    return {
        "temperature": temperature,
        "val_examples": len(gold),
        "val_ece_before": round(ece(scores, gold, 1.0), 5),
        "val_ece_after": round(ece(scores, gold, temperature), 5),
        "val_nll_before": round(nll(scores, gold, 1.0), 5),
        "val_nll_after": round(nll(scores, gold, temperature), 5),
    }
