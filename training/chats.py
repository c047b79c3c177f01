"""Chat records on disk: one JSON object per line, `{"messages": [...], "metadata": {...}}`.

Other people's data arrives through here, so every problem is reported as a `DatasetError` that
names the file and the line (1-based) and says what was expected; the CLI prints it as one line
and exits non-zero. Reading is strict on structure (a JSON object, a list of messages with string
roles and contents) and lenient on extras (other keys are carried along untouched).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from service.prompts import message_text

ROLES = {"system", "user", "assistant", "tool"}


class DatasetError(ValueError):
    """Bad input data, located: `str()` is `file:line: what is wrong`."""

    def __init__(self, path: Path | str, line: int | None, message: str):
        self.path = str(path)
        self.line = line
        self.reason = message
        where = f"{self.path}:{line}" if line is not None else self.path
        super().__init__(f"{where}: {message}")


@dataclass(frozen=True)
class ChatRecord:
    """A validated chat and where it came from."""

    messages: list[dict[str, Any]]
    metadata: dict[str, Any]
    path: str
    line: int

    @property
    def user_text(self) -> str:
        """The last user turn: what the router reads (see `service.prompts.router_messages`)."""
        return last_user_text(self.messages)

    @property
    def adapter(self) -> str | None:
        value = self.metadata.get("adapter")
        return value if isinstance(value, str) else None

    def to_json(self) -> dict[str, Any]:
        return {"messages": self.messages, "metadata": self.metadata}


def last_user_text(messages: list[dict[str, Any]]) -> str:
    users = [m for m in messages if m.get("role") == "user"]
    return message_text(users[-1]["content"]).strip() if users else ""


def normalize_text(text: str) -> str:
    """The key under which two user turns count as identical: case and whitespace folded."""
    return " ".join(text.split()).casefold()


def _check_messages(messages: Any, path: Path, line: int, need_assistant: bool) -> list[dict[str, Any]]:
    if not isinstance(messages, list) or not messages:
        raise DatasetError(path, line, "'messages' must be a non-empty list of {role, content} objects")
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise DatasetError(path, line, f"messages[{index}] is not an object")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise DatasetError(path, line, f"messages[{index}].role is {role!r}; expected one of {sorted(ROLES)}")
        if not isinstance(content, str | list):
            raise DatasetError(path, line, f"messages[{index}].content is missing or not a string")
    if not last_user_text(messages):
        raise DatasetError(path, line, "no user turn with text in 'messages'")
    if need_assistant:
        last = messages[-1]
        if last.get("role") != "assistant" or not message_text(last.get("content")).strip():
            raise DatasetError(path, line, "the last message must be a non-empty assistant answer")
    return messages


def read_chats(path: Path | str, need_assistant: bool = True, min_records: int = 1) -> list[ChatRecord]:
    """Every record of a chat JSONL file, validated; raises `DatasetError` at the first bad line."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(path, None, "file not found")
    records: list[ChatRecord] = []
    try:
        handle = path.open(encoding="utf-8")
    except OSError as exc:
        raise DatasetError(path, None, f"cannot read: {exc.strerror or exc}") from exc
    with handle:
        try:
            for number, raw in enumerate(handle, start=1):
                if not raw.strip():
                    continue
                try:
                    data = json.loads(raw)
                except ValueError as exc:
                    raise DatasetError(path, number, f"not valid JSON ({exc.msg} at column {exc.colno})") from exc
                if not isinstance(data, dict):
                    raise DatasetError(path, number, f"expected a JSON object, got {type(data).__name__}")
                if "messages" not in data:
                    raise DatasetError(path, number, "missing field 'messages'")
                messages = _check_messages(data["messages"], path, number, need_assistant)
                metadata = data.get("metadata") or {}
                if not isinstance(metadata, dict):
                    raise DatasetError(path, number, "'metadata' must be an object")
                records.append(ChatRecord(messages, metadata, str(path), number))
        except UnicodeDecodeError as exc:
            raise DatasetError(path, None, f"not UTF-8 text ({exc.reason})") from exc
    if len(records) < min_records:
        what = "empty file" if not records else f"only {len(records)} records"
        raise DatasetError(path, None, f"{what}: at least {min_records} chat record(s) needed")
    return records


def write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> int:
    """Write atomically (temp file + rename): a half-written dataset is never left behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    count = 0
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            for row in rows:
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
                count += 1
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return count


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(data, handle, indent=2, ensure_ascii=False)
            handle.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def fingerprint_files(paths: Iterable[Path]) -> str:
    """sha256 over the files' names and bytes: names the exact data an adapter was trained on."""
    digest = hashlib.sha256()
    for path in sorted(Path(p) for p in paths):
        digest.update(path.name.encode())
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()
