"""Chat records on disk: one JSON object per line, `{"messages": [...], "metadata": {...}}`.

Other people's data arrives through here, so every problem is reported as a `DatasetError` that
names the file and the line (1-based) and says what was expected; the CLI prints it as one line
and exits non-zero. Reading is strict on structure (a JSON object, a list of messages with string
roles and contents) and lenient on extras (other keys are carried along untouched).

Records may carry images, for vision-language base models: content parts
`{"type": "image", "image": "path.png"}`, or the seed format (a top-level `image` path, or an
`images` list, with `<image>` marking where each goes in the user turn; without markers the images
open the first user turn). Paths are relative to the JSONL file; each is checked to exist and to
decode as an image when the file is read, and stored as an absolute path in an `image` part, so
the datasets built from it (routing, splits) keep pointing at it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from service.multimodal import chat_images
from service.prompts import is_image_part, message_text

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
    tools: list[dict[str, Any]] | None = None  # OpenAI tools the request declared, rendered into its prompt

    @property
    def user_text(self) -> str:
        """The last user turn: what the router reads (see `service.prompts.router_messages`)."""
        return last_user_text(self.messages)

    @property
    def adapter(self) -> str | None:
        value = self.metadata.get("adapter")
        return value if isinstance(value, str) else None

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"messages": self.messages, "metadata": self.metadata}
        if self.tools:
            data["tools"] = self.tools
        return data


def last_user_text(messages: list[dict[str, Any]]) -> str:
    users = [m for m in messages if m.get("role") == "user"]
    return message_text(users[-1]["content"]).strip() if users else ""


def normalize_text(text: str) -> str:
    """The key under which two user turns count as identical: case and whitespace folded."""
    return " ".join(text.split()).casefold()


IMAGE_MARKER = "<image>"


def chat_key(messages: list[dict[str, Any]]) -> str:
    """The key under which two requests count as identical for deduplication and leakage checks:
    the last user turn's folded text and its images' content hashes. Two screenshots under the
    same words are different examples (a router may have to tell them apart by the image alone)."""
    users = [m for m in messages if m.get("role") == "user"]
    key = normalize_text(last_user_text(messages))
    digests = [_file_digest(str(p)) for p in chat_images(users[-1:])]
    return key + ("|" + ",".join(digests) if digests else "")


@functools.lru_cache(maxsize=65536)
def _file_digest(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def load_images(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The chat with each image part's path replaced by the decoded RGB image (what engines take)."""
    from PIL import Image

    def decoded(part: dict[str, Any]) -> dict[str, Any]:
        if not isinstance(part.get("image"), str):
            return part
        with Image.open(part["image"]) as image:
            return {"type": "image", "image": image.convert("RGB")}

    return _map_image_parts(messages, decoded)


def _map_image_parts(messages: list[dict[str, Any]], fn: Any) -> list[dict[str, Any]]:
    """The chat with `fn(part)` in place of every image part; everything else as it was."""
    return [{**m, "content": [fn(p) if is_image_part(p) else p for p in m["content"]]}
            if isinstance(m.get("content"), list) else m for m in messages]


def _resolve_images(data: dict[str, Any], messages: list[dict[str, Any]], path: Path, line: int
                    ) -> list[dict[str, Any]]:
    """Seed-format images into content parts; every image path absolute, existing and decodable."""
    seed = data.get("images", data.get("image"))
    if seed is not None:
        seed = [seed] if isinstance(seed, str) else seed
        if not isinstance(seed, list) or not all(isinstance(p, str) for p in seed):
            raise DatasetError(path, line, "'image' must be a path, 'images' a list of paths")
        messages = _place_seed_images(messages, list(seed), path, line)
    return _map_image_parts(messages, lambda part: {**part, "image": _checked_image(part.get("image"), path, line)})


def _place_seed_images(messages: list[dict[str, Any]], images: list[str], path: Path, line: int
                       ) -> list[dict[str, Any]]:
    markers = sum(m["content"].count(IMAGE_MARKER) for m in messages if isinstance(m.get("content"), str))
    if markers and markers != len(images):
        raise DatasetError(path, line, f"{markers} '{IMAGE_MARKER}' marker(s) for {len(images)} image(s)")
    queue = list(images)
    out = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, str) and (IMAGE_MARKER in content or (not markers and message["role"] == "user"
                                                                      and queue)):
            pieces = content.split(IMAGE_MARKER) if markers else ["", content]
            parts: list[dict[str, Any]] = []
            for index, piece in enumerate(pieces):
                if index:
                    parts.extend({"type": "image", "image": queue.pop(0)} for _ in range(1 if markers else
                                                                                          len(queue)))
                if piece.strip():
                    parts.append({"type": "text", "text": piece.strip()})
            message = {**message, "content": parts}
        out.append(message)
    return out


def _checked_image(value: Any, path: Path, line: int) -> str:
    if not isinstance(value, str) or not value:
        raise DatasetError(path, line, "an image part needs an 'image' path")
    image_path = (path.parent / value).resolve()
    if not image_path.is_file():
        raise DatasetError(path, line, f"image {value!r} not found (paths are relative to {path.parent})")
    reason = _unreadable_image(str(image_path))
    if reason:
        raise DatasetError(path, line, f"image {value!r} is not a readable image: {reason}")
    return str(image_path)


@functools.lru_cache(maxsize=65536)
def _unreadable_image(path: str) -> str:
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.verify()
    except Exception as exc:  # PIL raises many types for damaged files
        return str(exc) or type(exc).__name__
    return ""


def _check_messages(messages: Any, path: Path, line: int, need_assistant: bool) -> list[dict[str, Any]]:
    if not isinstance(messages, list) or not messages:
        raise DatasetError(path, line, "'messages' must be a non-empty list of {role, content} objects")
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise DatasetError(path, line, f"messages[{index}] is not an object")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise DatasetError(path, line, f"messages[{index}].role is {role!r}; expected one of {sorted(ROLES)}")
        if "tool_calls" in message:
            _check_tool_calls(message["tool_calls"], role, path, line, index)
            if content is None:  # OpenAI's shape: a turn that only calls tools has no content
                messages[index] = {**message, "content": ""}
                continue
        if not isinstance(content, str | list):
            raise DatasetError(path, line, f"messages[{index}].content is missing or not a string")
    if not last_user_text(messages):
        raise DatasetError(path, line, "no user turn with text in 'messages'")
    if need_assistant:
        last = messages[-1]
        if last.get("role") != "assistant" or not message_text(last.get("content")).strip():
            raise DatasetError(path, line, "the last message must be a non-empty assistant answer")
    return messages


def _check_tool_calls(calls: Any, role: Any, path: Path, line: int, index: int) -> None:
    if role != "assistant":
        raise DatasetError(path, line, f"messages[{index}] has tool_calls but is not an assistant turn")
    if not isinstance(calls, list) or not calls or not all(
            isinstance(c, dict) and isinstance(c.get("function"), dict) and isinstance(c["function"].get("name"), str)
            and isinstance(c["function"].get("arguments", ""), str | dict) for c in calls):
        raise DatasetError(path, line, f"messages[{index}].tool_calls must be a list of "
                                       "{function: {name, arguments}} objects")


def _check_tools(tools: Any, path: Path, line: int) -> list[dict[str, Any]] | None:
    if tools is None:
        return None
    if not isinstance(tools, list) or not all(
            isinstance(t, dict) and isinstance(t.get("function"), dict) and isinstance(t["function"].get("name"), str)
            for t in tools):
        raise DatasetError(path, line, "'tools' must be a list of OpenAI tools ({type, function: {name, ...}})")
    return tools


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
                messages = _resolve_images(data, messages, path, number)
                metadata = data.get("metadata") or {}
                if not isinstance(metadata, dict):
                    raise DatasetError(path, number, "'metadata' must be an object")
                tools = _check_tools(data.get("tools"), path, number)
                records.append(ChatRecord(messages, metadata, str(path), number, tools))
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
