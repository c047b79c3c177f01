"""Log-probabilities of the embedded engine's sampled tokens, as vLLM reports them by default
(`logprobs_mode="raw_logprobs"`): from the model's distribution before penalties, temperature and
top-k/top-p/min-p shaped the choice, so both engines give the same numbers for the same forward pass.
A structured-output row's grammar mask is applied first, as vLLM applies its bitmask before its
sampler: a token the grammar forbids has a log-probability of -inf. Captured from a step's logits
before the sampler touches them, then paired with the tokens it chose."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch

from service.engine.base import SamplingParams, TokenLogprob


class LogprobRow(Protocol):
    params: SamplingParams


class StepLogprobs:
    """The log-softmax of the rows of one step that asked for logprobs (only those: the others pay
    nothing), and their `k` most likely tokens."""

    def __init__(self, logits: torch.Tensor, rows: Sequence[LogprobRow]):
        self.wanted = {i: int(r.params.logprobs) for i, r in enumerate(rows) if r.params.logprobs is not None}
        self.logprobs: torch.Tensor | None = None
        self.top: tuple[list[list[float]], list[list[int]]] = ([], [])
        if not self.wanted:
            return
        index = list(self.wanted)
        self.logprobs = torch.log_softmax(logits[index].float(), dim=-1)
        k = min(max(self.wanted.values()), self.logprobs.shape[1])
        if k > 0:
            values, ids = self.logprobs.topk(k, dim=-1)
            self.top = (values.tolist(), ids.tolist())

    def of(self, tokens: Sequence[int]) -> list[TokenLogprob | None]:
        """One entry per row: the chosen token's log-probability and the row's top `k`; None for rows
        that did not ask."""
        out: list[TokenLogprob | None] = [None] * len(tokens)
        if self.logprobs is None:
            return out
        for k, (i, count) in enumerate(self.wanted.items()):
            top = tuple(zip(self.top[1][k][:count], self.top[0][k][:count], strict=True)) if count else ()
            out[i] = TokenLogprob(int(tokens[i]), float(self.logprobs[k, int(tokens[i])]), top)
        return out
