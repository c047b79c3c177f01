"""Incremental detokenization and stop strings, on the real SmolLM2 tokenizer."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from service.engine.text_stream import TextStream


@pytest.fixture(scope="module")
def tokenizer(base_model):
    return AutoTokenizer.from_pretrained(base_model.path)


def run(tokenizer, text: str, stop: tuple[str, ...]) -> tuple[str, bool]:
    stream = TextStream(tokenizer, stop)
    out = ""
    for token in tokenizer.encode(text, add_special_tokens=False):
        out += stream.push(token)
        if stream.stopped:
            return out, True
    return out + stream.flush(), False


def test_plain_text_round_trips(tokenizer):
    text = "Hello there! Ünïcödé and emoji 🎉 survive streaming."
    assert run(tokenizer, text, ()) == (text, False)


def test_stop_string_cuts_before_it(tokenizer):
    assert run(tokenizer, "one two three four", ("three",)) == ("one two ", True)


def test_earliest_of_several_stops_wins(tokenizer):
    assert run(tokenizer, "alpha beta gamma", ("gamma", "beta")) == ("alpha ", True)


def test_partial_stop_is_held_back_then_released(tokenizer):
    stream = TextStream(tokenizer, ("END",))
    released = "".join(stream.push(t) for t in tokenizer.encode("value EN", add_special_tokens=False))
    assert "EN" not in released  # could still become END
    assert released + stream.flush() == "value EN"
