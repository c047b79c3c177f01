"""`loramux.json`: what an adapter folder is, written next to its weights by `loramux train`.

The service reads it at registration (router labels, description, dataset, metrics, an expert's
`tools` and `tool_call_format`: how its answers become OpenAI tool calls) and at load time (an
expert's `system_prompt`, supplied when a caller sends none); evaluation reads the kind, labels and
tool names from it. One small JSON file, so a folder copied anywhere keeps its meaning.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from training.data.chats import write_json

METADATA_FILE = "loramux.json"
FORMAT = 1
Kind = Literal["router", "task"]


def build_metadata(
    kind: Kind,
    name: str,
    base_name: str,
    base_sha256: str,
    dataset: dict[str, Any],
    training: dict[str, Any],
    metrics: dict[str, Any],
    labels: list[str] | None = None,
    system_prompt: str | None = None,
    tools: list[str] | None = None,
    tool_call_format: str | None = None,
    tools_in_prompt: bool | None = None,
    description: str = "",
    preprocessing: dict[str, Any] | None = None,
    calibration: dict[str, Any] | None = None,
) -> dict[str, Any]:
    data: dict[str, Any] = {
        "format": FORMAT,
        "kind": kind,
        "name": name,
        "description": description,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "base_model": {"name": base_name, "sha256": base_sha256},
        "dataset": dataset,
        "training": training,
        "metrics": metrics,
        "preprocessing": preprocessing or {},
    }
    if kind == "router":
        data["labels"] = list(labels or [])
        data["calibration"] = calibration or {"temperature": 1.0}
    else:
        data["system_prompt"] = system_prompt
        data["tools"] = list(tools or [])
        data["tool_call_format"] = tool_call_format or "none"  # service.tool_calls: json, hermes or none
        # whether its training prompts described the declared tools (service.prompts.tools_to_show)
        data["tools_in_prompt"] = True if tools_in_prompt is None else bool(tools_in_prompt)
    return data


def write_metadata(folder: Path, data: dict[str, Any]) -> Path:
    path = folder / METADATA_FILE
    write_json(path, data)
    return path


def read_metadata(folder: Path) -> dict[str, Any]:
    """The adapter's metadata ({} when the folder has none: adapters trained elsewhere)."""
    for candidate in (folder / METADATA_FILE, folder / "final" / METADATA_FILE):
        if candidate.is_file():
            try:
                data = json.loads(candidate.read_text())
            except ValueError:
                return {}
            return data if isinstance(data, dict) else {}
    return {}


def update_metrics(folder: Path, key: str, values: dict[str, Any]) -> None:
    """Add evaluation results to an adapter's metadata (they travel into the registry with it)."""
    data = read_metadata(folder)
    if not data:
        return
    data.setdefault("metrics", {})[key] = values
    write_metadata(folder, data)
