"""Token log-probabilities in OpenAI's two formats: chat's `logprobs.content` (a list of
`{token, logprob, bytes, top_logprobs}`) and completions' `logprobs` (parallel lists `tokens`,
`token_logprobs`, `top_logprobs` dicts and `text_offset`), from the engines' `TokenLogprob`s.

Special tokens (the end-of-turn token) are left out: the answer's text never contains them (the
engines decode with `skip_special_tokens`), so the listed tokens are the text's. A token's `bytes`
are its own bytes (a byte-level BPE token may be half of a UTF-8 character); its `token` string is
those bytes decoded, with U+FFFD for an incomplete character, as vLLM shows it. `-inf` becomes
-9999.0, the JSON-safe value OpenAI and vLLM use."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

from service.engine.base import TokenLogprob

FLOOR = -9999.0
MAX_TOP_LOGPROBS = 20  # OpenAI's limit for top_logprobs, and vLLM's default max_logprobs


@functools.cache
def _byte_level_table() -> dict[str, int]:
    """GPT-2's byte-level alphabet (printable stand-ins for the 256 bytes), inverted."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[chr(byte)] = byte
        else:
            chars[chr(256 + extra)] = byte
            extra += 1
    return chars


class TokenText:
    """A tokenizer's tokens as OpenAI's logprobs show them: text and bytes of one token id."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.special = frozenset(tokenizer.all_special_ids)
        decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
        self.byte_level = type(decoder).__name__ == "ByteLevel"

    def bytes_of(self, token_id: int) -> bytes:
        if self.byte_level:
            table = _byte_level_table()
            piece = self.tokenizer.convert_ids_to_tokens(int(token_id))
            if isinstance(piece, str) and all(c in table for c in piece):
                return bytes(table[c] for c in piece)
        return self.tokenizer.decode([int(token_id)]).encode()

    def text_of(self, token_id: int) -> str:
        return self.bytes_of(token_id).decode("utf-8", errors="replace")

    def shown(self, entries: Sequence[TokenLogprob]) -> list[TokenLogprob]:
        return [e for e in entries if e.token_id not in self.special]


def _value(logprob: float) -> float:
    return max(logprob, FLOOR)


def chat_content(text: TokenText, entries: Sequence[TokenLogprob]) -> list[dict[str, Any]]:
    """Chat's `logprobs.content` entries for these tokens."""

    def one(token_id: int, logprob: float) -> dict[str, Any]:
        raw = text.bytes_of(token_id)
        return {"token": raw.decode("utf-8", errors="replace"), "logprob": _value(logprob), "bytes": list(raw)}

    return [one(e.token_id, e.logprob) | {"top_logprobs": [one(t, lp) for t, lp in e.top]}
            for e in text.shown(entries)]


def completion_logprobs(text: TokenText, entries: Sequence[TokenLogprob], offset: int = 0) -> dict[str, Any]:
    """Completions' `logprobs` for these tokens, `text_offset` counted from `offset` (the characters
    of the choice's text before them). `top_logprobs[i]` holds the `k` most likely tokens and the
    chosen one, as OpenAI documents it."""
    tokens, values, tops, offsets = [], [], [], []
    for entry in text.shown(entries):
        token = text.text_of(entry.token_id)
        tokens.append(token)
        values.append(_value(entry.logprob))
        top = {text.text_of(t): _value(lp) for t, lp in entry.top}
        top.setdefault(token, _value(entry.logprob))
        tops.append(top)
        offsets.append(offset)
        offset += len(token)
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}


def next_offset(logprobs: dict[str, Any], offset: int) -> int:
    """The text offset after a `completion_logprobs` block that started at `offset` (where a
    stream's next block starts)."""
    if not logprobs["tokens"]:
        return offset
    return int(logprobs["text_offset"][-1]) + len(logprobs["tokens"][-1])
