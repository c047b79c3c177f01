"""The cheap lower bound on a prompt's tokens (`service.prompts.fewest_prompt_tokens`) that lets the
request path refuse a megabyte of text without tokenizing it on the event loop. If it ever exceeds
the real count, a prompt that fits would be refused: so it is checked against the real tokenizers
(SmolLM2's byte-level BPE and Qwen3's), on text built to pack as many bytes into a token as possible."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from service.prompts import fewest_prompt_tokens, longest_token_bytes, prompt_ids

# the vocabulary's longest entries are runs of one character (spaces, '#', '=', '-'), so runs of
# those are where bytes per token peak; special-token spellings are one token for many bytes
PIECES = st.sampled_from([" " * 80, "#" * 80, "=" * 64, "-" * 64, "\n", "<|im_start|>", "<|im_end|>",
                          "hello world ", "zażółć gęślą jaźń ", "東京都 ", "🙂", "\t\t"])
TEXTS = st.lists(st.one_of(PIECES, st.text(max_size=40)), max_size=60).map("".join)
MESSAGES = st.lists(
    st.tuples(st.sampled_from(["system", "user", "assistant"]), TEXTS), min_size=1, max_size=4,
).map(lambda turns: [{"role": role, "content": text} for role, text in turns])


@pytest.fixture(scope="module", params=["smollm2", "qwen3"])
def tokenizer(request: pytest.FixtureRequest) -> Any:
    if request.param == "smollm2":
        return AutoTokenizer.from_pretrained(request.getfixturevalue("base_model").path)
    return AutoTokenizer.from_pretrained(request.getfixturevalue("tiny_vl"))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(messages=MESSAGES)
def test_the_bound_never_exceeds_the_real_count(tokenizer: Any, messages: list[dict[str, Any]]) -> None:
    assert fewest_prompt_tokens(tokenizer, messages) <= len(prompt_ids(tokenizer, messages))


def test_the_bound_holds_for_the_vocabularys_longest_tokens_repeated(tokenizer: Any) -> None:
    """The worst case by construction: a text made of the vocabulary's longest tokens, each repeated,
    packs the most bytes into each token the tokenizer will ever produce."""
    decoder = tokenizer.backend_tokenizer.decoder
    longest = sorted(tokenizer.get_vocab(), key=lambda token: -len(decoder.decode([token]).encode()))[:20]
    for token in longest:
        messages = [{"role": "user", "content": decoder.decode([token]) * 50}]
        assert fewest_prompt_tokens(tokenizer, messages) <= len(prompt_ids(tokenizer, messages)), repr(token)


def test_the_bound_is_tight_enough_to_refuse_a_megabyte(tokenizer: Any) -> None:
    """Useful, not only safe: one token stands for at most a few dozen bytes, so 1.5 MB of text is
    known to be over 2048 tokens many times over before any tokenization."""
    assert longest_token_bytes(tokenizer) < 200
    assert fewest_prompt_tokens(tokenizer, [{"role": "user", "content": "and also " * 170_000}]) > 5 * 2048
