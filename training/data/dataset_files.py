"""Finding the train/val/eval data of a dataset path, whatever shape it was given in.

`loramux train` and `loramux eval` accept a folder with `train.jsonl` (and optionally `val.jsonl`,
`eval.jsonl`, `card.json`), as `loramux dataset build` writes it, or a single JSONL file of chats,
which is then split here with the same leakage-free stratified split (by `metadata.intent`, or
`metadata.adapter`, when present). The fingerprint names the exact bytes trained on.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from training.data.cards import CARD_JSON
from training.data.chats import ChatRecord, DatasetError, chat_key, fingerprint_files, read_chats
from training.data.splits import SplitError, stratified_split


@dataclass
class DatasetSplits:
    path: Path
    train: list[ChatRecord]
    val: list[ChatRecord]
    eval: list[ChatRecord]
    fingerprint: str
    card: dict[str, Any] = field(default_factory=dict)

    def split(self, name: str) -> list[ChatRecord]:
        if name not in ("train", "val", "eval"):
            raise ValueError(f"unknown split {name!r}")
        return getattr(self, name)

    def counts(self) -> dict[str, int]:
        return {"train": len(self.train), "val": len(self.val), "eval": len(self.eval)}


def _class_of(record: ChatRecord) -> str:
    return str(record.metadata.get("intent") or record.metadata.get("adapter") or "all")


def load_splits(path: Path | str, seed: int = 0, fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
                need_train: bool = True) -> DatasetSplits:
    path = Path(path)
    if path.is_dir():
        files = {name: path / f"{name}.jsonl" for name in ("train", "val", "eval")}
        if need_train and not files["train"].is_file():
            raise DatasetError(path, None, "no train.jsonl in this folder (expected train/val/eval.jsonl)")
        if not any(f.is_file() for f in files.values()):
            raise DatasetError(path, None, "no train.jsonl, val.jsonl or eval.jsonl in this folder")
        loaded = {name: read_chats(f) if f.is_file() else [] for name, f in files.items()}
        card: dict[str, Any] = {}
        if (path / CARD_JSON).is_file():
            try:
                card = json.loads((path / CARD_JSON).read_text())
            except ValueError as exc:
                raise DatasetError(path / CARD_JSON, None, f"not valid JSON: {exc}") from exc
        present = [f for f in files.values() if f.is_file()]
        return DatasetSplits(path, loaded["train"], loaded["val"], loaded["eval"], fingerprint_files(present), card)
    if path.is_file():
        records = read_chats(path)
        classes = {_class_of(r) for r in records}
        label = _class_of if all(
            sum(1 for r in records if _class_of(r) == c) >= 3 for c in classes
        ) else (lambda r: "all")
        try:
            parts = stratified_split(records, label, lambda r: chat_key(r.messages), fractions, seed)
        except SplitError as exc:
            raise DatasetError(path, None, str(exc)) from exc
        return DatasetSplits(path, parts["train"], parts["val"], parts["eval"], fingerprint_files([path]))
    raise DatasetError(path, None, "dataset not found (give a folder with train.jsonl or a .jsonl file)")


def answer_labels(records: list[ChatRecord]) -> list[str]:
    """The distinct assistant answers: a router's label set when no card names it."""
    from service.prompts import message_text

    return sorted({message_text(r.messages[-1]["content"]).strip() for r in records})
