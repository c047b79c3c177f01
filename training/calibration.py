"""Temperature scaling for the router's confidence (Guo et al., 2017).

A LoRA trained to near-zero loss on a few hundred examples is over-confident: it says 0.999 where it
is right nine times in ten, and then `LORAMUX_ROUTE_THRESHOLD` means nothing. One scalar `T`,
fitted on the validation split at the end of training by minimising the negative log-likelihood of
`softmax(scores / T)`, fixes most of that without changing a single decision (dividing every score
by the same positive number keeps their order). It is stored with the router (`loramux.json`,
then the registry) and applied when serving.

A validation split the router gets entirely right has no finite NLL minimiser: the likelihood only
grows as T shrinks towards 0, and the fitted router would then claim certainty that a few dozen
examples cannot support. So the fit is against targets smoothed by eps = 1 / (n + 2) (Laplace's
rule of succession: after n successes in n trials, the next is a success with probability
(n + 1) / (n + 2)): the confidence never claims more than the validation evidence shows, and with
hundreds of examples the smoothing is negligible.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from training import metrics as m

MIN_T, MAX_T = 0.05, 20.0


def nll(scores: Sequence[Sequence[float]], gold: Sequence[int], temperature: float, smoothing: float = 0.0
        ) -> float:
    """Mean cross-entropy under softmax(scores / temperature) against targets that give the gold
    candidate 1 - smoothing and share `smoothing` among the others (0: the plain NLL)."""
    total = 0.0
    for row, g in zip(scores, gold, strict=True):
        scaled = [s / temperature for s in row]
        peak = max(scaled)
        log_z = peak + math.log(sum(math.exp(s - peak) for s in scaled))
        total += (1 - smoothing) * (log_z - scaled[g])
        if smoothing and len(row) > 1:
            total += smoothing * sum(log_z - s for i, s in enumerate(scaled) if i != g) / (len(row) - 1)
    return total / max(1, len(gold))


def fit_temperature(scores: Sequence[Sequence[float]], gold: Sequence[int]) -> float:
    """The temperature in [MIN_T, MAX_T] that minimises the smoothed validation NLL: golden-section
    search on log T (the cross-entropy is convex in 1/T, so unimodal on this interval). 1.0 with
    no data."""
    if not gold:
        return 1.0
    eps = 1.0 / (len(gold) + 2)
    lo, hi = math.log(MIN_T), math.log(MAX_T)
    ratio = (math.sqrt(5) - 1) / 2
    a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    fa, fb = nll(scores, gold, math.exp(a), eps), nll(scores, gold, math.exp(b), eps)
    for _ in range(60):
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - ratio * (hi - lo)
            fa = nll(scores, gold, math.exp(a), eps)
        else:
            lo, a, fa = a, b, fb
            b = lo + ratio * (hi - lo)
            fb = nll(scores, gold, math.exp(b), eps)
    return round(math.exp((lo + hi) / 2), 4)


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
