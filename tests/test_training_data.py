"""Task data from the real public sources, chat-file validation, and the loss masks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest

from tests.support import PROJECT_ROOT
from training.data.chats import DatasetError, normalize_text, read_chats
from training.data.sources import hass, timeparse
from training.data.task_datasets import build_task_datasets
from training.data.tool_calls import CALENDAR_TOOL, is_valid_tool_call, parse_tool_call
from training.data.tool_schemas import tool_schemas


@pytest.fixture(scope="module")
def intents():
    return hass.load_intents()


@pytest.mark.parametrize("expert", sorted(hass.EXPERTS))
def test_home_assistant_experts(expert: str, intents) -> None:
    spec = hass.EXPERTS[expert]
    records = hass.expert_records(spec, 120, seed=1, intents=intents)
    assert len(records) == 120
    assert len({normalize_text(r["messages"][1]["content"]) for r in records}) == 120  # distinct user texts
    used = {r["metadata"]["intent"] for r in records}
    assert used <= spec.intents and len(used) >= 3
    for record in records:
        system, user, answer = (m["content"] for m in record["messages"])
        assert system == spec.system_prompt and "{" not in user and "<" not in user  # fully expanded
        call = parse_tool_call(answer)
        assert call is not None and call["name"] == record["metadata"]["intent"]
        assert is_valid_tool_call(answer, spec.intents)
        # every text slot we filled is visible in the sentence (numbers may be spelled as digits)
        for key, value in call["arguments"].items():
            if key in {"area", "name", "item", "search_query", "floor"}:
                assert str(value).lower() in user.lower(), (key, value, user)
    assert hass.expert_records(spec, 120, seed=1, intents=intents) == records  # seeded


def test_domain_filter_keeps_names_in_their_expert(intents) -> None:
    lights = hass.expert_records(hass.EXPERTS["lights"], 200, seed=2, intents=intents)
    allowed = set(hass.NAMES_BY_DOMAIN["light"]) | set(hass.NAMES_BY_DOMAIN["switch"])
    names = {parse_tool_call(r["messages"][2]["content"])["arguments"].get("name") for r in lights} - {None}
    assert names and names <= allowed


@pytest.mark.parametrize(
    ("gold", "arguments"),
    [
        ("Time[]{2019-01-01 19:25 (X/X)}", {"value": "2019-01-01T19:25"}),
        ("Time[]{2018-03-12 X:X (X/morning)}", {"value": "2018-03-12", "part_of_day": "morning"}),
        ("Time[]{2019-X-X X:X (X/X)}", {"value": "2019"}),
        ("Time[]{X-X-X 17:30 (X/X)}", {"value": "17:30"}),
        ("Interval[]{2017-03-12 18:40 (X/X) - 2017-03-12 19:45 (X/X)}",
         {"start": "2017-03-12T18:40", "end": "2017-03-12T19:45"}),
        ("Duration[]{30 minutes}", {"duration": "PT30M"}),
        ("Time[]{X-X-12 X:X (X/X)}", None),  # a day of month without a month is not ISO-8601
    ],
)
def test_ctparse_gold_to_iso(gold: str, arguments: dict | None) -> None:
    assert timeparse.gold_arguments(gold) == arguments


def test_calendar_records_are_valid_tool_calls() -> None:
    records, dropped = timeparse.calendar_records()
    assert len(records) > 1000 and dropped["not representable in ISO-8601"] > 0
    assert all(is_valid_tool_call(r["messages"][2]["content"], [CALENDAR_TOOL]) for r in records)
    assert any("It is now 2018-12-31T12:43 (Monday)" in r["messages"][0]["content"] for r in records)


def test_task_dataset_folders(tmp_path: Path) -> None:
    built = build_task_datasets(tmp_path, ["timer", "calendar"], per_expert=60, seed=0)
    for data in built.values():
        splits = {s: read_chats(data.path / f"{s}.jsonl") for s in ("train", "val", "eval")}
        texts = {s: {normalize_text(r.user_text) for r in rows} for s, rows in splits.items()}
        assert not (texts["train"] & texts["eval"]) and not (texts["train"] & texts["val"])
        assert sum(len(rows) for rows in splits.values()) == 60 == len(read_chats(data.all_file))
        card = json.loads((data.path / "card.json").read_text())
        assert card["sources"][0]["license"] in {"Apache-2.0", "MIT"} and card["tools"] == data.tools
        # the tools an agent would declare: one per tool the answers call, and every answer fits its schema
        schemas = {t["function"]["name"]: t["function"] for t in card["tool_schemas"]}
        assert card["tool_schemas"] == data.tool_schemas and set(schemas) <= set(data.tools)
        for record in read_chats(data.all_file):
            call = parse_tool_call(record.messages[-1]["content"])
            jsonschema.validate(call["arguments"], {**schemas[call["name"]]["parameters"],
                                                    "additionalProperties": False})
    assert built["timer"].system_prompt and built["calendar"].system_prompt is None
    timer_calls = {r.metadata["intent"] for r in read_chats(built["timer"].all_file)}
    assert {t["function"]["name"] for t in built["timer"].tool_schemas} == timer_calls


def test_tool_schemas_type_every_argument_the_answers_pass() -> None:
    answers = ['{"name": "HassLightSet", "arguments": {"brightness": 50, "name": "desk lamp"}}',
               '{"name": "HassLightSet", "arguments": {"brightness": 12.5, "color": "red"}}',
               '{"name": "resolve_time", "arguments": {"value": "2019"}}', "not a call"]
    tools = tool_schemas(answers)
    assert [t["function"]["name"] for t in tools] == ["HassLightSet", "resolve_time"]
    light = tools[0]["function"]
    assert light["description"] == "Light set"
    assert light["parameters"]["properties"] == {"brightness": {"type": ["integer", "number"]},
                                                 "color": {"type": "string"}, "name": {"type": "string"}}
    assert tools[1]["function"]["description"] == "Resolve time"


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


GOOD = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})


@pytest.mark.parametrize(
    ("lines", "line", "fragment"),
    [
        ([], None, "empty file"),
        ([GOOD, "{not json"], 2, "not valid JSON"),
        ([GOOD, "[1, 2]"], 2, "expected a JSON object"),
        ([GOOD, GOOD, json.dumps({"text": "hi"})], 3, "missing field 'messages'"),
        ([json.dumps({"messages": []})], 1, "non-empty list"),
        ([json.dumps({"messages": [{"role": "user"}]})], 1, "content is missing"),
        ([json.dumps({"messages": [{"role": "wizard", "content": "x"}]})], 1, "role is 'wizard'"),
        ([json.dumps({"messages": [{"role": "system", "content": "x"}, {"role": "assistant", "content": "y"}]})],
         1, "no user turn"),
        ([json.dumps({"messages": [{"role": "user", "content": "x"}]})], 1, "last message must be"),
        ([json.dumps({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}],
                      "metadata": [1]})], 1, "'metadata' must be an object"),
    ],
)
def test_bad_chat_files_name_file_and_line(tmp_path: Path, lines: list[str], line: int | None, fragment: str
                                           ) -> None:
    path = _write(tmp_path / "data.jsonl", lines)
    with pytest.raises(DatasetError) as info:
        read_chats(path)
    assert info.value.line == line and fragment in str(info.value)
    assert str(info.value).startswith(f"{path}:{line}:" if line else f"{path}:")


def test_blank_lines_are_skipped(tmp_path: Path) -> None:
    path = _write(tmp_path / "data.jsonl", ["", GOOD, "   ", GOOD])
    assert [r.line for r in read_chats(path)] == [2, 4]


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "loramux", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT)})


@pytest.mark.parametrize(
    ("case", "fragment"),
    [
        ("bad_json", "bad.jsonl:2: not valid JSON"),
        ("empty", "empty.jsonl: empty file"),
        ("missing", "missing.jsonl:3: missing field 'messages'"),
        ("one_class", "at least two adapters"),
        ("too_few", "few.jsonl: adapter 'b' has 2 distinct user text(s)"),
        ("no_equals", "a source must be NAME=FILE.jsonl"),
    ],
)
def test_dataset_build_cli_rejects_garbage(tmp_path: Path, case: str, fragment: str) -> None:
    good = _write(tmp_path / "good.jsonl", [json.dumps({"messages": [{"role": "user", "content": f"q{i}"}]})
                                           for i in range(10)])
    files = {
        "bad_json": _write(tmp_path / "bad.jsonl", [GOOD, "{oops"]),
        "empty": _write(tmp_path / "empty.jsonl", []),
        "missing": _write(tmp_path / "missing.jsonl", [GOOD, GOOD, '{"prompt": "hi"}']),
        "too_few": _write(tmp_path / "few.jsonl", [GOOD, GOOD.replace("hi", "ho")]),
    }
    sources = {
        "one_class": ["--source", f"a={good}"],
        "no_equals": ["--source", f"a={good}", "--source", str(good)],
    }.get(case, ["--source", f"a={good}", "--source", f"b={files.get(case)}"])
    done = _cli("dataset", "build", *sources, "--out", str(tmp_path / "out"), cwd=tmp_path)
    assert done.returncode != 0
    output = done.stdout + done.stderr
    assert fragment in " ".join(output.replace("│", " ").split()), output
    assert "Traceback" not in output
    assert not (tmp_path / "out" / "train.jsonl").exists()
