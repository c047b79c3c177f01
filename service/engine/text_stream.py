"""Incremental detokenization with stop strings, for engines that produce token ids.

Each token is decoded once, by the tokenizer library's own incremental decoder (`tokenizers`'
`DecodeStream`, the one vLLM's detokenizer uses), instead of re-decoding the whole output at every
step: the cost per token stays flat however long the answer grows. The decoder itself holds back
an incomplete UTF-8 sequence; here a suffix that could still grow into a stop string is held back
too. Text is released only when it can no longer change; when a stop string appears, the text
before it is final and the generation ends with finish_reason "stop".
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tokenizers.decoders import DecodeStream


class TextStream:
    def __init__(self, tokenizer: Any, stop: Sequence[str] = ()):
        self.backend = tokenizer.backend_tokenizer  # the Rust tokenizer behind a transformers fast tokenizer
        self.decoder = DecodeStream(skip_special_tokens=True)
        self.stop = [s for s in stop if s]
        self.text = ""  # everything decoded so far
        self.emitted = 0  # characters of the final text already released
        self.stopped = False

    def push(self, token_id: int) -> str:
        """Add one token; return the newly releasable text (possibly empty)."""
        self.text += self.decoder.step(self.backend, token_id) or ""
        text = self.text
        if self.stop:
            search_from = max(0, self.emitted - max(len(s) for s in self.stop))
            hits = [i for i in (text.find(s, search_from) for s in self.stop) if i >= 0]
            if hits:
                self.stopped = True
                return self._release(text[: min(hits)])
        return self._release(text[: len(text) - self._partial_stop_suffix(text)])

    def flush(self) -> str:
        """The generation ended for another reason: release whatever is held back."""
        if self.stopped:
            return ""
        return self._release(self.text)

    def _release(self, final: str) -> str:
        if len(final) <= self.emitted:
            return ""
        out = final[self.emitted :]
        self.emitted = len(final)
        return out

    def _partial_stop_suffix(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of a stop string."""
        best = 0
        for stop in self.stop:
            for size in range(min(len(stop) - 1, len(text)), 0, -1):
                if text.endswith(stop[:size]):
                    best = max(best, size)
                    break
        return best
