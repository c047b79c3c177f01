"""Sampling for the embedded engine: the next token of every row of a batch from its logits, each row
with its own settings, so greedy, sampled and seeded rows decode in one forward pass."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Protocol

import torch

from service.engine.base import SamplingParams

# below this temperature sampling is greedy (as in vLLM): 1/T overflows the logits long before T reaches 0
SAMPLING_EPS = 1e-5


class SampledRow(Protocol):
    params: SamplingParams
    generator: torch.Generator | None


def row_generator(params: SamplingParams) -> torch.Generator | None:
    """A row's own random stream: seeded rows repeat whatever else shares their batch."""
    if params.temperature < SAMPLING_EPS:
        return None
    generator = torch.Generator()
    generator.manual_seed(params.seed if params.seed is not None else int(time.time_ns() % 2**63))
    return generator


def sample(logits: torch.Tensor, rows: Sequence[SampledRow]) -> list[int]:
    """One token per row of `logits` ([rows, vocab]): argmax for greedy rows, else temperature and
    top-p, drawn from the row's own generator."""
    greedy = logits.argmax(dim=-1).tolist()
    tokens = []
    for index, row in enumerate(rows):
        p = row.params
        if p.temperature < SAMPLING_EPS:
            tokens.append(int(greedy[index]))
            continue
        probs = torch.softmax(logits[index].float() / p.temperature, dim=-1)
        if p.top_p < 1.0:
            sorted_probs, order = probs.sort(descending=True)
            keep = sorted_probs.cumsum(0) - sorted_probs < p.top_p
            sorted_probs = sorted_probs * keep
            probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
        if not bool(torch.isfinite(probs).all()) or float(probs.sum()) <= 0:
            # one row's extreme settings must not fail the whole batch's step: greedy is its limit
            tokens.append(int(greedy[index]))
            continue
        tokens.append(int(torch.multinomial(probs, 1, generator=row.generator)))
    return tokens
