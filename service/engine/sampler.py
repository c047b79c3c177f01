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
    prompt_ids: list[int]
    output_ids: list[int]  # the tokens generated so far, for the penalties


def has_penalties(params: SamplingParams) -> bool:
    return params.presence_penalty != 0.0 or params.frequency_penalty != 0.0 or params.repetition_penalty != 1.0


def row_generator(params: SamplingParams) -> torch.Generator | None:
    """A row's own random stream: seeded rows repeat whatever else shares their batch."""
    if params.temperature < SAMPLING_EPS:
        return None
    generator = torch.Generator()
    generator.manual_seed(params.seed if params.seed is not None else int(time.time_ns() % 2**63))
    return generator


def sample(logits: torch.Tensor, rows: Sequence[SampledRow]) -> list[int]:
    """One token per row of `logits` ([rows, vocab]), each row by its own settings, in vLLM's order:
    penalties, then the argmax for greedy rows; for sampled rows temperature, min-p, top-k and top-p,
    then a draw from the row's own generator. Rows that use none of these (greedy, no penalty) take
    the argmax of the raw logits, computed once for the whole batch as it always was: the float32
    parity with plain peft rests on that. `logits` itself is never modified (the raw distribution is
    what logprobs report)."""
    greedy = [int(t) for t in logits.argmax(dim=-1).tolist()]
    penalized = [i for i, r in enumerate(rows) if has_penalties(r.params)]
    sampled = [i for i, r in enumerate(rows) if r.params.temperature >= SAMPLING_EPS]
    if not penalized and not sampled:
        return greedy
    active = sorted({*penalized, *sampled})
    at = {row: k for k, row in enumerate(active)}
    work = logits[active].float()  # a copy: only these rows are processed
    if penalized:
        where = [at[i] for i in penalized]
        work[where] = apply_penalties(work[where], [rows[i] for i in penalized])
    tokens = list(greedy)
    for i in penalized:
        if rows[i].params.temperature < SAMPLING_EPS:
            tokens[i] = int(work[at[i]].argmax())
    if not sampled:
        return tokens
    probs = sampling_probs(work[[at[i] for i in sampled]], [rows[i].params for i in sampled])
    for k, i in enumerate(sampled):
        row_probs = probs[k]
        if not bool(torch.isfinite(row_probs).all()) or float(row_probs.sum()) <= 0:
            # one row's extreme settings must not fail the whole batch's step: greedy is its limit
            tokens[i] = int(work[at[i]].argmax())
            continue
        tokens[i] = int(torch.multinomial(row_probs, 1, generator=rows[i].generator))
    return tokens


def apply_penalties(logits: torch.Tensor, rows: Sequence[SampledRow]) -> torch.Tensor:
    """vLLM's penalties (`apply_penalties`; OpenAI's definitions for the first two), for the rows of
    `logits` ([rows, vocab], float32): repetition over the tokens of the prompt and of the output (a
    positive logit divided by it, a negative one multiplied), then frequency (times each token's count
    in the output) and presence (once per token present in the output) subtracted."""
    count, vocab = logits.shape
    output = torch.zeros(count, vocab)
    in_prompt = torch.zeros(count, vocab, dtype=torch.bool)
    for k, row in enumerate(rows):
        if row.output_ids:
            output[k] = torch.bincount(torch.tensor(row.output_ids), minlength=vocab)[:vocab].float()
        if row.params.repetition_penalty != 1.0 and row.prompt_ids:
            ids = torch.tensor(row.prompt_ids)
            in_prompt[k, ids[ids < vocab]] = True
    seen = output > 0
    repetition = torch.tensor([r.params.repetition_penalty for r in rows]).unsqueeze(1)
    penalty = torch.where(seen | in_prompt, repetition, torch.ones(()))
    logits = torch.where(logits > 0, logits / penalty, logits * penalty)
    logits -= torch.tensor([r.params.frequency_penalty for r in rows]).unsqueeze(1) * output
    logits -= torch.tensor([r.params.presence_penalty for r in rows]).unsqueeze(1) * seen
    return logits


def sampling_probs(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """The distribution each sampled row draws from ([rows, vocab], not renormalised after top-p):
    temperature, then min-p (tokens below `min_p` times the most likely one's probability are out),
    top-k (ties with the k-th kept, as vLLM keeps them) and top-p over what is left; each keeps at
    least the most likely token."""
    vocab = logits.shape[1]
    scaled = logits / torch.tensor([p.temperature for p in params]).unsqueeze(1)
    min_p = torch.tensor([p.min_p for p in params]).unsqueeze(1)
    if bool((min_p > 0).any()):
        probs = torch.softmax(scaled, dim=-1)
        scaled = scaled.masked_fill(probs < min_p * probs.amax(dim=-1, keepdim=True), float("-inf"))
    limits = torch.tensor([p.top_k if 0 < p.top_k < vocab else 0 for p in params])
    if bool((limits > 0).any()):
        top = scaled.topk(int(limits.max()), dim=-1).values
        kth = top.gather(1, (limits - 1).clamp(min=0).unsqueeze(1))
        kth = kth.masked_fill((limits == 0).unsqueeze(1), float("-inf"))
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = torch.softmax(scaled, dim=-1)
    top_p = torch.tensor([p.top_p for p in params]).unsqueeze(1)
    if bool((top_p < 1.0).any()):
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        keep = (sorted_probs.cumsum(dim=-1) - sorted_probs < top_p) | (top_p >= 1.0)
        probs = torch.zeros_like(probs).scatter(1, order, sorted_probs * keep)
    return probs
