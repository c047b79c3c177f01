"""Scoring candidate continuations on a transformers model: one prefill, one batched pass.

Routing asks for the total log-probability of every candidate name (its tokens and the end-of-turn
token) after the router's prompt. Scoring each name with a forward pass of its own costs one
prefill per name; here the prompt is prefilled once, its KV cache is shared (not copied) by one row
per leaf of the candidates' prefix tree, and a single forward over those rows gives every token's
log-probability. Rows are right-padded: with causal attention a padding token only follows the real
ones, so no position that is read ever sees it.

Used by the embedded engine for `/route` and by training to measure validation routing accuracy
with the model being trained, so both count the same thing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from service.engine import kv_batch
from service.routing.candidates import leaf_rows


def tail_positions(start: int, length: int, rows: int, rope_delta: int | None) -> torch.Tensor:
    """Position ids of `length` text tokens after a prompt of `start` tokens, for `rows` rows:
    `[rows, length]`, or `[4, rows, length]` (text positions, then the three MRoPE rows shifted by
    the prompt's `rope_delta`) after a prompt with images."""
    text = torch.arange(start, start + length).unsqueeze(0).expand(rows, -1)
    if rope_delta is None:
        return text
    return torch.cat([text.unsqueeze(0), (text + rope_delta).unsqueeze(0).expand(3, -1, -1)], dim=0)


def continuation_logprobs(
    model: Any,
    cache: Any,
    last_logits: torch.Tensor,
    start: int,
    continuations: Sequence[Sequence[int]],
    model_kwargs: Callable[[int], dict[str, Any]] = lambda rows: {},
    rope_delta: int | None = None,
    pad_id: int = 0,
) -> list[float]:
    """Total log-probability of each continuation after a prompt of `start` tokens whose KV is in
    `cache` (batch of one) and whose next-token logits are `last_logits`. `model_kwargs(rows)` adds
    per-batch arguments (the adapter of every row)."""
    first = torch.log_softmax(last_logits.float(), dim=-1)
    scores = [float(first[int(c[0])]) if len(c) else 0.0 for c in continuations]
    rows = leaf_rows(continuations)
    if not rows:
        return scores
    length = max(len(r) for r in rows)
    input_ids = torch.tensor([[*r, *([pad_id] * (length - len(r)))] for r in rows])
    out = model(
        input_ids=input_ids,
        past_key_values=kv_batch.repeat(cache, len(rows), model.config),
        position_ids=tail_positions(start, length, len(rows), rope_delta),
        use_cache=True,
        **model_kwargs(len(rows)),
    )
    logprobs = torch.log_softmax(out.logits.float(), dim=-1)
    for i, cont in enumerate(continuations):
        if len(cont) < 2:
            continue
        inputs = tuple(int(t) for t in cont[:-1])
        row = next(j for j, r in enumerate(rows) if r[: len(inputs)] == inputs)
        scores[i] += float(sum(logprobs[row, j, int(cont[j + 1])] for j in range(len(cont) - 1)))
    return scores
