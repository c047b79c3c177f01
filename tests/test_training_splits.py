"""Splits and balancing: property tests (hypothesis) plus the routing dataset built end to end."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.prompts import ROUTER_SYSTEM_PROMPT
from training.data.chats import normalize_text
from training.data.routing_dataset import build_routing_dataset
from training.data.splits import SPLITS, SplitError, balance, check_no_leakage, split_sizes, stratified_split

WORDS = ["turn", "on", "the", "lamp", "Kitchen", "timer", "play", "jazz", "tomorrow", "at", "5", "pm", " ", "  "]

# (label, text) items; texts may repeat within a class and differ only in case/whitespace
item_lists = st.lists(
    st.tuples(
        st.sampled_from(["a", "b", "c", "d"]),
        st.lists(st.sampled_from(WORDS), min_size=1, max_size=4).map(lambda ws: " ".join(ws)),
    ),
    min_size=0,
    max_size=120,
)


def _usable(items: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Drop texts claimed by two labels and classes with fewer than 3 distinct texts."""
    owners: dict[str, set[str]] = {}
    for label, text in items:
        owners.setdefault(normalize_text(text), set()).add(label)
    items = [(label, text) for label, text in items if len(owners[normalize_text(text)]) == 1]
    distinct = Counter(label for label, _ in {(lab, normalize_text(t)) for lab, t in items})
    return [(label, text) for label, text in items if distinct[label] >= 3]


def _split(items: list[tuple[str, str]], seed: int) -> dict[str, list[tuple[str, str]]]:
    return stratified_split(items, lambda x: x[0], lambda x: normalize_text(x[1]), (0.7, 0.15, 0.15), seed)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(item_lists, st.integers(0, 10_000))
def test_split_is_a_partition_without_leakage(raw: list[tuple[str, str]], seed: int) -> None:
    items = _usable(raw)
    splits = _split(items, seed)
    assert sorted(x for s in SPLITS for x in splits[s]) == sorted(items)  # nothing lost, nothing duplicated
    check_no_leakage(splits, lambda x: normalize_text(x[1]))
    keys = [{normalize_text(t) for _, t in splits[s]} for s in SPLITS]
    assert not (keys[0] & keys[1]) and not (keys[0] & keys[2]) and not (keys[1] & keys[2])


@settings(max_examples=150, deadline=None)
@given(item_lists, st.integers(0, 10_000))
def test_split_is_stratified(raw: list[tuple[str, str]], seed: int) -> None:
    items = _usable(raw)
    splits = _split(items, seed)
    for label in {label for label, _ in items}:
        groups = len({normalize_text(t) for lab, t in items if lab == label})
        expected = split_sizes(groups, (0.7, 0.15, 0.15))
        got = tuple(len({normalize_text(t) for lab, t in splits[s] if lab == label}) for s in SPLITS)
        assert got == expected
        assert all(n >= 1 for n in got)  # every class is present in every split


@settings(max_examples=60, deadline=None)
@given(item_lists, st.integers(0, 10_000))
def test_split_depends_on_seed_and_texts_only(raw: list[tuple[str, str]], seed: int) -> None:
    items = _usable(list(dict.fromkeys(raw)))
    shuffled = list(items)
    random.Random(seed).shuffle(shuffled)
    first, second = _split(items, seed), _split(shuffled, seed)
    for s in SPLITS:
        assert sorted(first[s]) == sorted(second[s])


@settings(max_examples=100, deadline=None)
@given(st.dictionaries(st.sampled_from(["a", "b", "c", "d"]), st.integers(1, 40), min_size=1),
       st.sampled_from(["upsample", "cap", "none"]), st.integers(0, 1000))
def test_balance(sizes: dict[str, int], mode: str, seed: int) -> None:
    items = [(label, f"{label}{i}") for label, n in sizes.items() for i in range(n)]
    out, report = balance(items, lambda x: x[0], mode, seed)
    counts = Counter(label for label, _ in out)
    if mode == "upsample":
        assert set(counts.values()) == {max(sizes.values())}
        assert set(out) == set(items)  # every original kept; extras are repeats
    elif mode == "cap":
        assert set(counts.values()) == {min(sizes.values())}
        assert set(out) <= set(items) and len(set(out)) == len(out)
    else:
        assert counts == Counter(sizes)
    assert {k: v["after"] for k, v in report.items()} == dict(counts)
    assert {k: v["before"] for k, v in report.items()} == sizes


def test_leakage_check_catches_a_shared_text() -> None:
    splits = {"train": [("a", "Turn on  the lamp")], "val": [], "eval": [("a", "turn on the lamp")]}
    with pytest.raises(SplitError, match="leakage"):
        check_no_leakage(splits, lambda x: normalize_text(x[1]))


def test_too_few_texts_is_an_error() -> None:
    with pytest.raises(SplitError, match="class 'a'"):
        _split([("a", "one"), ("a", "two"), ("b", "x"), ("b", "y"), ("b", "z")], 0)


def _chat_file(path: Path, texts: list[str], adapter: str | None = None) -> Path:
    with path.open("w") as handle:
        for text in texts:
            record = {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": text},
                                   {"role": "assistant", "content": "ok"}]}
            if adapter:
                record["metadata"] = {"adapter": adapter}
            handle.write(json.dumps(record) + "\n")
    return path


def test_routing_dataset_end_to_end(tmp_path: Path) -> None:
    a = _chat_file(tmp_path / "a.jsonl", [f"switch on lamp {i}" for i in range(40)] + ["Switch on lamp 1", "shared"])
    b = _chat_file(tmp_path / "b.jsonl", [f"play song {i}" for i in range(12)] + ["SHARED"], adapter="music")
    out = build_routing_dataset({"lights": a, "music": b}, tmp_path / "routing", (0.8, 0.1, 0.1), seed=3)
    rows = {s: [json.loads(line) for line in (out.path / f"{s}.jsonl").open()] for s in SPLITS}
    # the router's prompt is the serving prompt, the answer is the adapter name
    for row in rows["train"]:
        assert [m["role"] for m in row["messages"]] == ["system", "user", "assistant"]
        assert row["messages"][0]["content"] == ROUTER_SYSTEM_PROMPT
        assert row["messages"][2]["content"] == row["metadata"]["adapter"]
    # duplicates folded, the ambiguous text dropped from both
    texts = [normalize_text(r["messages"][1]["content"]) for s in SPLITS for r in rows[s]]
    assert "shared" not in texts
    assert out.card["processing"]["duplicates dropped"] == 1
    # train is balanced by upsampling; val/eval keep their natural counts; no text in two splits
    assert Counter(r["metadata"]["adapter"] for r in rows["train"]) == {"lights": 32, "music": 32}
    assert out.counts["eval"] == {"lights": 4, "music": 1}
    seen = {s: {normalize_text(r["messages"][1]["content"]) for r in rows[s]} for s in SPLITS}
    assert not (seen["train"] & seen["eval"]) and not (seen["train"] & seen["val"]) and not (seen["val"] & seen["eval"])
    assert (out.path / "card.json").is_file() and "| lights |" in (out.path / "README.md").read_text()
