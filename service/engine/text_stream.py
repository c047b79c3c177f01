"""Incremental detokenization with stop strings, for engines that produce token ids.

Text is released only when it can no longer change: an incomplete UTF-8 sequence (decoded as
U+FFFD) or a suffix that could still grow into a stop string is held back. When a stop string
appears, the text before it is final and the generation ends with finish_reason "stop".
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


class TextStream:
    def __init__(self, tokenizer: Any, stop: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.token_ids: list[int] = []
        self.emitted = 0  # characters of the final text already released
        self.stopped = False

    def push(self, token_id: int) -> str:
        """Add one token; return the newly releasable text (possibly empty)."""
        self.token_ids.append(token_id)
        text = self.tokenizer.decode(self.token_ids, skip_special_tokens=True)
        if self.stop:
            search_from = max(0, self.emitted - max(len(s) for s in self.stop))
            hits = [i for i in (text.find(s, search_from) for s in self.stop) if i >= 0]
            if hits:
                self.stopped = True
                return self._release(text[: min(hits)])
        end = len(text)
        if text.endswith("\ufffd"):
            end = len(text.rstrip("\ufffd"))
        end = min(end, len(text) - self._partial_stop_suffix(text))
        return self._release(text[:end])

    def flush(self) -> str:
        """The generation ended for another reason: release whatever is held back."""
        if self.stopped:
            return ""
        text = self.tokenizer.decode(self.token_ids, skip_special_tokens=True)
        return self._release(text)

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
