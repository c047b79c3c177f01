"""Candidate names as token sequences, and the prefix tree both engines score them with.

Every candidate is scored the same way, whatever the label set: the total log-probability of its
name's tokens followed by the chat template's end-of-turn token. A name that is a token prefix of
another (`calendar` / `calendar-read`) is then a different sequence, and adding one name never
changes how the others are scored. The prefix tree says which next-token distributions that needs:
one per distinct prefix, the empty prefix (the prompt itself) first.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

Prefix = tuple[int, ...]


def needed_steps(continuations: Sequence[Sequence[int]]) -> dict[Prefix, set[int]]:
    """For each distinct prefix of the continuations, the next tokens whose log-probabilities are
    needed after it. The empty prefix is the prompt's own next-token distribution."""
    steps: dict[Prefix, set[int]] = {}
    for cont in continuations:
        for i, token in enumerate(cont):
            steps.setdefault(tuple(int(t) for t in cont[:i]), set()).add(int(token))
    return steps


def leaf_rows(continuations: Sequence[Sequence[int]]) -> list[Prefix]:
    """The fewest input rows whose positions cover every continuation: each continuation minus its
    last token is a prefix of exactly one returned row (the leaves of the prefix tree), so a causal
    forward over these rows yields every needed distribution."""
    inputs = sorted({tuple(int(t) for t in cont[:-1]) for cont in continuations if len(cont) > 1}, key=len,
                    reverse=True)
    rows: list[Prefix] = []
    for item in inputs:
        if not any(row[: len(item)] == item for row in rows):
            rows.append(item)
    return rows


def total(table: Mapping[Prefix, Mapping[int, float]], cont: Sequence[int]) -> float:
    """Chain rule: the sum of the continuation's token log-probabilities, read from `table`."""
    return float(sum(table[tuple(int(t) for t in cont[:i])][int(tok)] for i, tok in enumerate(cont)))
