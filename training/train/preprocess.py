"""Chats -> token ids and labels, with the loss on the assistant's answer only.

The prompt is rendered by the base model's own chat template with `add_generation_prompt=True`,
exactly as the service renders a request, and the answer is the tokens the model must then
produce: the answer text followed by the end-of-turn token (where generation stops). Everything
before the answer is labelled -100, so the adapter learns to answer, not to echo prompts. For a
router this also makes the first answer token the very token `Router.decide` scores.

Examples longer than `max_length` are dropped (not truncated: a cut answer teaches the wrong
thing) and reported by class, so a too-small limit is visible instead of silently skewing data.

Chats with images (vision-language base models) are expanded here with the serving engine's own
`VisionInputs` (placeholders -> patch tokens, pixels, MRoPE positions), so the lengths filtered
are the real ones and training sees exactly the positions serving computes.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from service.prompts import answer_tokens, message_text, prompt_ids
from service.tool_calls import CallFormat
from training.data.chats import ChatRecord

IGNORE = -100


@dataclass
class Tokenized:
    input_ids: list[int]
    labels: list[int]
    label: str
    position_ids: list[list[int]] | None = None  # [4][len]: text + MRoPE rows, vision-language models
    pixel_values: Any = None  # tensor [patches, dim] of the chat's images, or None
    image_grid_thw: Any = None  # tensor [images, 3]


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


def tokenize_chat(tokenizer: Any, messages: Sequence[dict[str, Any]], label: str = "", vision: Any = None,
                  tools: Sequence[dict[str, Any]] | None = None, call_format: CallFormat = "json") -> Tokenized:
    """Token ids of prompt + answer, labels -100 everywhere except the answer and its end token.
    With `vision` (a `VisionInputs`), every chat gets MRoPE positions and its images' pixels.
    `tools` (the record's) and earlier calls in the chat are rendered as serving renders them for
    an adapter that writes calls in `call_format`."""
    if not messages or messages[-1].get("role") != "assistant":
        raise ValueError("the last message must be the assistant's answer")
    prompt = prompt_ids(tokenizer, messages[:-1], None, tools, call_format)
    answer = answer_tokens(tokenizer, message_text(messages[-1]["content"]))
    if vision is None:
        return Tokenized([*prompt, *answer], [IGNORE] * len(prompt) + answer, label)
    return _with_images(vision, messages, prompt, answer, label)


def _with_images(vision: Any, messages: Sequence[dict[str, Any]], prompt: list[int], answer: list[int],
                 label: str) -> Tokenized:
    import torch

    from service.multimodal import chat_images
    from training.data.chats import load_images

    images = chat_images(load_images(list(messages[:-1])))
    if not images:
        length = len(prompt) + len(answer)
        return Tokenized([*prompt, *answer], [IGNORE] * len(prompt) + answer, label, [list(range(length))] * 4)
    expanded = vision.prepare(prompt, images, torch.float32)
    whole = expanded.with_tail(answer)
    return Tokenized(whole.ids, [IGNORE] * len(expanded.ids) + answer, label,
                     [list(range(len(whole.ids))), *whole.mrope.tolist()], whole.pixel_values, whole.image_grid_thw)


def tokenize_records(
    tokenizer: Any, records: Sequence[ChatRecord], max_length: int, label_of: Any = None, vision: Any = None,
    call_format: CallFormat = "json",
) -> tuple[list[Tokenized], LengthReport]:
    """Tokenize and length-filter; `label_of(record)` names the class used in the report."""
    report = LengthReport(max_length)
    out: list[Tokenized] = []
    for record in records:
        label = label_of(record) if label_of else str(record.adapter or record.metadata.get("intent") or "all")
        item = tokenize_chat(tokenizer, record.messages, label, vision, record.tools, call_format)
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
    """A `datasets.Dataset` with `input_ids` and `labels`: SFTTrainer uses such data as is. Chats
    of a vision-language model also carry `position_ids`, `pixel_values` and `image_grid_thw`
    (empty without images), which `VisionCollator` turns into a batch."""
    from datasets import Dataset

    columns: dict[str, list] = {"input_ids": [i.input_ids for i in items], "labels": [i.labels for i in items]}
    if any(i.position_ids is not None for i in items):
        columns["position_ids"] = [i.position_ids for i in items]
        columns["pixel_values"] = [[] if i.pixel_values is None else i.pixel_values.tolist() for i in items]
        columns["image_grid_thw"] = [[] if i.image_grid_thw is None else i.image_grid_thw.tolist() for i in items]
    return Dataset.from_dict(columns)


class VisionCollator:
    """Right-padded batches of vision-language chats: ids, labels, mask, `[4, batch, len]` positions,
    and every row's image patches concatenated in row order (the order the model fills them in)."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        length = max(len(r["input_ids"]) for r in rows)

        def padded(key: str, value: int) -> torch.Tensor:
            return torch.tensor([list(r[key]) + [value] * (length - len(r[key])) for r in rows])

        positions = torch.zeros(4, len(rows), length, dtype=torch.long)
        for b, row in enumerate(rows):
            position = torch.tensor(row["position_ids"])
            positions[:, b, : position.shape[1]] = position
        batch = {
            "input_ids": padded("input_ids", self.pad_id),
            "labels": padded("labels", IGNORE),
            "attention_mask": torch.tensor([[1] * len(r["input_ids"]) + [0] * (length - len(r["input_ids"]))
                                            for r in rows]),
            "position_ids": positions,
        }
        pixels = [torch.tensor(r["pixel_values"]) for r in rows if len(r["pixel_values"])]
        if pixels:
            batch["pixel_values"] = torch.cat(pixels)
            batch["image_grid_thw"] = torch.cat([torch.tensor(r["image_grid_thw"]) for r in rows
                                                 if len(r["image_grid_thw"])])
        return batch
