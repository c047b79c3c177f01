"""Stratified train/val/eval splits without leakage, and class balancing.

Splits are made per class over *groups* of identical user text (case and whitespace folded), so
one text can never land in two splits; `check_no_leakage` verifies it on the result rather than
trusting the construction. The assignment depends only on the seed and the set of texts (groups
are sorted before the seeded shuffle), not on the order the input arrived in.
"""

from __future__ import annotations

import random
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from typing import TypeVar

T = TypeVar("T")
SPLITS = ("train", "val", "eval")
BALANCE_MODES = ("upsample", "cap", "none")


class SplitError(ValueError):
    """The data cannot be split or balanced as asked (too few examples, leakage found)."""


def split_sizes(groups: int, fractions: Sequence[float]) -> tuple[int, int, int]:
    """(train, val, eval) group counts for one class: val and eval get at least one group each."""
    if groups < 3:
        raise SplitError(f"{groups} distinct example(s); at least 3 are needed for train/val/eval")
    _, f_val, f_eval = fractions
    n_val = max(1, round(groups * f_val))
    n_eval = max(1, round(groups * f_eval))
    n_train = groups - n_val - n_eval
    if n_train < 1:
        n_train, n_val, n_eval = groups - 2, 1, 1
    return n_train, n_val, n_eval


def check_fractions(fractions: Sequence[float]) -> tuple[float, float, float]:
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
        raise SplitError(f"split fractions must be three non-negative numbers summing to 1, got {list(fractions)}")
    if fractions[0] <= 0:
        raise SplitError("the train fraction must be positive")
    return float(fractions[0]), float(fractions[1]), float(fractions[2])


def stratified_split(
    items: Sequence[T],
    label: Callable[[T], str],
    key: Callable[[T], str],
    fractions: Sequence[float] = (0.8, 0.1, 0.1),
    seed: int = 0,
) -> dict[str, list[T]]:
    """Split `items` into train/val/eval, per class, keeping every group of equal `key` together."""
    fractions = check_fractions(fractions)
    groups: dict[str, dict[str, list[T]]] = defaultdict(dict)
    owner: dict[str, str] = {}
    for item in items:
        cls, k = label(item), key(item)
        if owner.setdefault(k, cls) != cls:
            raise SplitError(f"text {k!r} is labelled both {owner[k]!r} and {cls!r}")
        groups[cls].setdefault(k, []).append(item)
    out: dict[str, list[T]] = {name: [] for name in SPLITS}
    for cls in sorted(groups):
        keys = sorted(groups[cls])
        random.Random(f"{seed}:{cls}").shuffle(keys)
        try:
            n_train, n_val, _ = split_sizes(len(keys), fractions)
        except SplitError as exc:
            raise SplitError(f"class {cls!r}: {exc}") from None
        parts = {"train": keys[:n_train], "val": keys[n_train : n_train + n_val], "eval": keys[n_train + n_val :]}
        for split, split_keys in parts.items():
            for k in split_keys:
                out[split].extend(groups[cls][k])
    return out


def check_no_leakage(splits: dict[str, list[T]], key: Callable[[T], str]) -> None:
    """Raise if any key occurs in more than one split (checked on the data, not assumed)."""
    seen: dict[str, str] = {}
    for split in SPLITS:
        for item in splits.get(split, []):
            k = key(item)
            first = seen.setdefault(k, split)
            if first != split:
                raise SplitError(f"leakage: {k!r} is in both {first} and {split}")


def balance(
    items: Sequence[T], label: Callable[[T], str], mode: str = "upsample", seed: int = 0
) -> tuple[list[T], dict[str, dict[str, int]]]:
    """Equalise class counts: `upsample` repeats random examples of smaller classes up to the
    largest, `cap` samples larger classes down to the smallest, `none` keeps everything. Returns
    the items (shuffled) and {class: {before, after}}."""
    if mode not in BALANCE_MODES:
        raise SplitError(f"balance mode {mode!r}: expected one of {', '.join(BALANCE_MODES)}")
    by_class: dict[str, list[T]] = defaultdict(list)
    for item in items:
        by_class[label(item)].append(item)
    if not by_class:
        return [], {}
    rng = random.Random(f"{seed}:balance")
    sizes = {cls: len(members) for cls, members in by_class.items()}
    target = max(sizes.values()) if mode == "upsample" else min(sizes.values())
    out: list[T] = []
    for cls in sorted(by_class):
        members = by_class[cls]
        if mode == "upsample" and len(members) < target:
            members = members + [rng.choice(members) for _ in range(target - len(members))]
        elif mode == "cap" and len(members) > target:
            members = rng.sample(members, target)
        out.extend(members)
    rng.shuffle(out)
    after = Counter(label(item) for item in out)
    report = {cls: {"before": sizes[cls], "after": after[cls]} for cls in sorted(by_class)}
    return out, report


def cap_per_class(items: Sequence[T], label: Callable[[T], str], limit: int | None, seed: int = 0) -> list[T]:
    """At most `limit` items per class (a seeded sample), order kept."""
    if limit is None:
        return list(items)
    by_class: dict[str, list[int]] = defaultdict(list)
    for index, item in enumerate(items):
        by_class[label(item)].append(index)
    keep: set[int] = set()
    rng = random.Random(f"{seed}:cap")
    for cls in sorted(by_class):
        indices = by_class[cls]
        keep.update(indices if len(indices) <= limit else rng.sample(indices, limit))
    return [item for index, item in enumerate(items) if index in keep]
