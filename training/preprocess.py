"""Chats -> token ids and labels, with the loss on the assistant's answer only.

The prompt is rendered by the base model's own chat template with `add_generation_prompt=True`,
exactly as the service renders a request, and the answer is the tokens the model must then
produce: the answer text followed by the end-of-turn token (where generation stops). Everything
before the answer is labelled -100, so the adapter learns to answer, not to echo prompts. For a
router this also makes the first answer token the very token `Router.decide` scores.

Examples longer than `max_length` are dropped (not truncated: a cut answer teaches the wrong
thing) and reported by class, so a too-small limit is visible instead of silently skewing data.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from service.prompts import message_text
from training.chats import ChatRecord

IGNORE = -100


@dataclass
class Tokenized:
    input_ids: list[int]
    labels: list[int]
    label: str


@dataclass
class LengthReport:
    """What length filtering kept and dropped."""

    max_length: int
    kept: int = 0
    dropped: Counter[str] = field(default_factory=Counter)
    longest_kept: int = 0
    longest_dropped: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "max_length": self.max_length,
            "kept": self.kept,
            "dropped": sum(self.dropped.values()),
            "dropped_by_class": dict(sorted(self.dropped.items())),
            "longest_kept": self.longest_kept,
            "longest_dropped": self.longest_dropped,
        }

    def summary(self) -> str:
        dropped = sum(self.dropped.values())
        text = f"kept {self.kept} examples (longest {self.longest_kept} tokens); "
        text += f"dropped {dropped} over {self.max_length}"
        if dropped:
            text += " (" + ", ".join(f"{k}: {v}" for k, v in sorted(self.dropped.items())) + ")"
        return text


def end_of_turn_id(tokenizer: Any) -> int:
    """The token that ends an assistant turn in this chat template (SmolLM2, Qwen: <|im_end|>)."""
    token_id = tokenizer.eos_token_id
    if token_id is None:
        raise ValueError("the tokenizer has no eos token; cannot mark the end of an answer")
    return int(token_id)


def prompt_ids(tokenizer: Any, messages: Sequence[dict[str, Any]]) -> list[int]:
    """The prompt as the service builds it: chat template + generation prompt."""
    ids = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=True, return_dict=False)
    return list(ids)


def tokenize_chat(tokenizer: Any, messages: Sequence[dict[str, Any]], label: str = "") -> Tokenized:
    """Token ids of prompt + answer, labels -100 everywhere except the answer and its end token."""
    if not messages or messages[-1].get("role") != "assistant":
        raise ValueError("the last message must be the assistant's answer")
    prompt = prompt_ids(tokenizer, messages[:-1])
    answer = tokenizer.encode(message_text(messages[-1]["content"]), add_special_tokens=False)
    answer = [*answer, end_of_turn_id(tokenizer)]
    return Tokenized([*prompt, *answer], [IGNORE] * len(prompt) + answer, label)


def tokenize_records(
    tokenizer: Any, records: Sequence[ChatRecord], max_length: int, label_of: Any = None
) -> tuple[list[Tokenized], LengthReport]:
    """Tokenize and length-filter; `label_of(record)` names the class used in the report."""
    report = LengthReport(max_length)
    out: list[Tokenized] = []
    for record in records:
        label = label_of(record) if label_of else str(record.adapter or record.metadata.get("intent") or "all")
        item = tokenize_chat(tokenizer, record.messages, label)
        length = len(item.input_ids)
        if length > max_length:
            report.dropped[label] += 1
            report.longest_dropped = max(report.longest_dropped, length)
            continue
        report.kept += 1
        report.longest_kept = max(report.longest_kept, length)
        out.append(item)
    return out, report


def to_hf_dataset(items: Sequence[Tokenized]) -> Any:
    """A `datasets.Dataset` with `input_ids` and `labels`: SFTTrainer uses such data as is."""
    from datasets import Dataset

    return Dataset.from_dict({"input_ids": [i.input_ids for i in items], "labels": [i.labels for i in items]})
