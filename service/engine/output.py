"""One generation's output, built the same way for both engines (the shape of vLLM v1's
`OutputProcessor`): engine steps of new token ids go in, `TokenDelta`s come out, with the text
released by `TextStream` (incremental detokenizer, stop strings held back), the end-of-sequence
tokens, `max_tokens` and the finish reason decided here and nowhere else. An engine only samples
and feeds the tokens; whether and why a generation ends is one rule for both.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from service.engine.base import FinishReason, SamplingParams, TokenDelta, TokenLogprob
from service.engine.text_stream import TextStream


def end_of_sequence_ids(model_path: Path, tokenizer: Any) -> frozenset[int]:
    """The tokens that end a generation: the model's `generation_config.json` `eos_token_id` (one id or a
    list: chat models end a turn with `<|im_end|>` and the document with `<|endoftext|>`) and the
    tokenizer's own EOS."""
    ids: list[Any] = [tokenizer.eos_token_id]
    config = Path(model_path) / "generation_config.json"
    if config.is_file():
        configured = json.loads(config.read_text()).get("eos_token_id")
        ids.extend(configured if isinstance(configured, list) else [configured])
    return frozenset(int(i) for i in ids if i is not None)


class OutputBuilder:
    """Token steps of one request in, deltas out; `finished` once it has ended."""

    def __init__(self, tokenizer: Any, eos: frozenset[int], params: SamplingParams):
        self.stream = TextStream(tokenizer, params.stop)
        self.eos = frozenset() if params.ignore_eos else eos  # vLLM's `ignore_eos`: only max_tokens or a stop string
        self.max_tokens = params.max_tokens
        self.generated = 0
        self.finish_reason: FinishReason | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def step(self, token_ids: Sequence[int], engine_finish: FinishReason | None = None,
             logprobs: Sequence[TokenLogprob] = ()) -> TokenDelta | None:
        """Add an engine step's new tokens (one for the embedded engine, a few for vLLM). Tokens after
        the one that ends the generation are dropped. `engine_finish`: the engine ended the sequence
        itself (vLLM's own length limit). `logprobs`: the tokens' log-probabilities when the request
        asked for them, one per token, kept for the tokens taken. None when the step releases nothing."""
        if self.finished:
            return None
        text, taken = "", []
        for token in token_ids:
            if self.finished:
                break
            self.generated += 1
            taken.append(int(token))
            if token in self.eos:
                text += self.stream.flush()
                self.finish_reason = "stop"
            else:
                text += self.stream.push(int(token))
                if self.stream.stopped:
                    self.finish_reason = "stop"
                elif self.generated >= self.max_tokens:
                    text += self.stream.flush()
                    self.finish_reason = "length"
        if not self.finished and engine_finish is not None:
            text += self.stream.flush()
            self.finish_reason = engine_finish
        if not (text or taken or self.finished):
            return None
        return TokenDelta(text, self.generated, self.finish_reason if self.finished else None, taken,
                          list(logprobs[: len(taken)]))
