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


def test_one_output_builder_ends_a_generation_for_both_engines(tokenizer, base_model):
    """`OutputBuilder` decides the end: the first end-of-sequence token ends it (tokens after it in the
    same engine step are dropped), `max_tokens` ends it with "length", a stop string with "stop", and an
    engine's own finish is taken only when nothing else ended it; nothing is emitted after the end."""
    from service.engine.base import SamplingParams
    from service.engine.output import OutputBuilder, end_of_sequence_ids

    eos = end_of_sequence_ids(base_model.path, tokenizer)
    assert tokenizer.eos_token_id in eos and tokenizer.convert_tokens_to_ids("<|im_end|>") in eos
    words = tokenizer.encode("one two three four", add_special_tokens=False)
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")

    out = OutputBuilder(tokenizer, eos, SamplingParams(max_tokens=50))
    delta = out.step([*words[:2], end, *words[2:]])  # one vLLM step carrying the end and more
    assert delta is not None and delta.finish_reason == "stop" and delta.completion_tokens == 3
    assert delta.text == tokenizer.decode(words[:2]) and out.step(words) is None

    out = OutputBuilder(tokenizer, eos, SamplingParams(max_tokens=2))
    deltas = [out.step([w]) for w in words]
    assert [d.finish_reason for d in deltas[:2] if d] == [None, "length"] and deltas[2:] == [None, None]

    out = OutputBuilder(tokenizer, eos, SamplingParams(max_tokens=50, stop=("three",)))
    text = "".join(d.text for d in (out.step([w]) for w in words) if d)
    assert text == "one two " and out.finish_reason == "stop"

    out = OutputBuilder(tokenizer, eos, SamplingParams(max_tokens=50))
    delta = out.step(words[:1], engine_finish="length")
    assert delta is not None and delta.finish_reason == "length" and delta.text == "one"
