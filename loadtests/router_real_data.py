"""The router on real public intent data (`python -m loadtests.router_real_data`).

Every number the demo shows comes from data this project generated; this measures the router on
intent sets other people wrote (SNIPS, ATIS, Kwik-E-Mart: see `loadtests.intent_data` for where each
comes from and its licence). Per dataset, with a fixed seed:

1. sample `--per-class` training utterances per intent from the dataset's train pool and `--heldout`
   per intent from its own test split (topped up from the rest of the pool when the test split is
   short or absent), never sharing a normalized text;
2. write one chat JSONL per intent and build the routing dataset with the project's own
   `build_routing_dataset`; the held-out utterances go into a separate folder (`eval.jsonl` written
   with the builder's own record format), so the router never sees them while training or validating;
3. train a router with `TrainConfig`'s defaults (only `--max-steps`, for smoke runs, overrides);
4. evaluate it with `training.evaluate.router_and_experts.evaluate_router` on the held-out folder, and score a classical
   TF-IDF + logistic-regression baseline trained on exactly the router's training utterances, so
   "router - baseline" compares two models that saw the same data.

Datasets named with `--kept-aside` are listed in their own section: they are the ones nobody tuned
defaults on, so their numbers are the honest estimate. Everything goes to `<out>/results.json`.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
import shutil
import sys
import time
import traceback
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loadtests.intent_data import DEFAULT_CACHE, LOADERS, IntentData, load
from training.data.cards import write_card
from training.data.chats import normalize_text, read_chats, write_json, write_jsonl
from training.data.routing_dataset import Example, build_routing_dataset
from training.evaluate import metrics

SEED = 0
# The builder always keeps >= 1 eval example per class (training.data.splits.split_sizes), so an empty eval
# split is not possible; the brief's fallback fractions are used. The router is evaluated on the
# separate held-out folder, not on this eval split.
FRACTIONS = (0.8, 0.15, 0.05)
BALANCE = "upsample"  # the builder's default; classes are sampled equal, so it changes nothing
Pairs = list[tuple[str, str]]


@dataclass
class Sample:
    """What one dataset contributes to one run: training and held-out texts per label, and why
    labels were left out (too few distinct utterances for `per_class` + `heldout`)."""

    train: dict[str, list[str]]
    heldout: dict[str, list[str]]
    heldout_from_pool: dict[str, int]
    dropped: dict[str, str] = field(default_factory=dict)

    @property
    def labels(self) -> list[str]:
        return sorted(self.train)


# --- sampling -----------------------------------------------------------------------------------


def ambiguous_keys(data: IntentData) -> set[str]:
    """Normalized texts that occur under two labels anywhere (pool or test): no gold answer exists."""
    owners: dict[str, set[str]] = {}
    for groups in (data.pool, data.heldout or {}):
        for label, texts in groups.items():
            for text in texts:
                owners.setdefault(normalize_text(text), set()).add(label)
    return {key for key, labels in owners.items() if len(labels) > 1}


def _shuffled(texts: Sequence[str], skip: set[str], rng: random.Random) -> list[str]:
    """Distinct texts not in `skip`, in a seeded order that does not depend on the input order."""
    by_key = {normalize_text(t): t for t in texts}
    keys = sorted(k for k in by_key if k not in skip)
    rng.shuffle(keys)
    return [by_key[k] for k in keys]


def sample_dataset(data: IntentData, per_class: int, heldout: int, seed: int = SEED) -> Sample:
    """Per label: `per_class` training texts from the pool, then `heldout` texts from the test split
    (minus anything sampled for training), topped up from the unused pool. A label that cannot fill
    both is dropped, rather than measured on fewer examples than the others."""
    skip = ambiguous_keys(data)
    sample = Sample({}, {}, {})
    for label in sorted(data.pool):
        rng = random.Random(f"{seed}:{data.name}:{label}")
        pool = _shuffled(data.pool[label], skip, rng)
        train, rest = pool[:per_class], pool[per_class:]
        used = skip | {normalize_text(t) for t in train}
        from_test = _shuffled((data.heldout or {}).get(label, []), used, rng)
        used |= {normalize_text(t) for t in from_test}
        from_pool = [t for t in rest if normalize_text(t) not in used]
        held = (from_test + from_pool)[:heldout]
        if len(train) < per_class or len(held) < heldout:
            sample.dropped[label] = (f"{len(pool)} distinct in pool, {len(from_test)} more in the test split: "
                                     f"needs {per_class} + {heldout}")
            continue
        sample.train[label], sample.heldout[label] = train, held
        sample.heldout_from_pool[label] = max(0, len(held) - len(from_test))
    return sample


# --- dataset folders ----------------------------------------------------------------------------


def write_sources(folder: Path, texts: Mapping[str, list[str]], data: IntentData) -> dict[str, Path]:
    """One chat JSONL per label (the user turn only: a routing source needs nothing else)."""
    sources: dict[str, Path] = {}
    for label, items in sorted(texts.items()):
        meta = {"adapter": label, "license": data.license, "source": data.source}
        rows = ({"messages": [{"role": "user", "content": text}], "metadata": meta} for text in items)
        sources[label] = folder / f"{label}.jsonl"
        write_jsonl(sources[label], rows)
    return sources


def write_heldout_dataset(folder: Path, sources: Mapping[str, Path], data: IntentData) -> dict[str, int]:
    """A routing folder with only `eval.jsonl`, in the builder's exact record format (`Example.to_json`:
    the router prompt from service.prompts.router_messages + the label as the answer), and a card."""
    rows: list[dict[str, Any]] = []
    counts: dict[str, int] = {}
    for label, path in sorted(sources.items()):
        records = read_chats(path, need_assistant=False)
        rows.extend(Example(label, record).to_json() for record in records)
        counts[label] = len(records)
    write_jsonl(folder / "eval.jsonl", rows)
    write_card(folder, {
        "title": f"Held-out routing set: {data.name} ({len(counts)} labels)",
        "description": f"Held-out utterances for measuring a router trained elsewhere. {data.source}.",
        "kind": "routing",
        "labels": sorted(counts),
        "counts": {"train": {}, "val": {}, "eval": counts},
        "sources": [{"name": data.name, "origin": data.source, "license": data.license, "records": len(rows)}],
    })
    return counts


def split_pairs(path: Path) -> Pairs:
    """(user text, label) of a routing JSONL: what the router was actually trained on."""
    from training.evaluate.router_and_experts import router_gold

    seen: dict[str, tuple[str, str]] = {}
    for record in read_chats(path):
        seen.setdefault(normalize_text(record.user_text), (record.user_text, router_gold(record)))
    return list(seen.values())


# --- the classical baseline ---------------------------------------------------------------------


class BaselineUnavailable(RuntimeError):
    """scikit-learn (or training.evaluate.baseline) cannot be imported."""


def _inline_tfidf_logreg(train: Pairs, test: Pairs) -> list[str]:
    """Word 1-2 + char_wb 2-5 gram TF-IDF (sublinear), logistic regression C=10: the usual strong
    classical intent classifier, so the router has a fair, cheap competitor."""
    try:
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import FeatureUnion, make_pipeline
    except ImportError as exc:
        raise BaselineUnavailable(f"scikit-learn is not installed ({exc}); run .venv/bin/pip install scikit-learn"
                                  ) from exc
    features = FeatureUnion([
        ("word", TfidfVectorizer(analyzer="word", ngram_range=(1, 2), sublinear_tf=True)),
        ("char", TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 5), sublinear_tf=True)),
    ])
    model = make_pipeline(features, LogisticRegression(C=10, max_iter=2000))
    model.fit([t for t, _ in train], [y for _, y in train])
    return [str(p) for p in model.predict([t for t, _ in test])]


def _scores(gold: list[str], predicted: list[str], labels: list[str]) -> dict[str, Any]:
    classes = metrics.per_class(gold, predicted, labels)
    return {"accuracy": metrics.accuracy(gold, predicted), "macro_f1": metrics.macro_f1(classes), "per_class": classes}


def _from_project(result: Any, gold: list[str], labels: list[str]) -> dict[str, Any]:
    """training.evaluate.baseline's answer as {accuracy, macro_f1, ...}, whichever shape it has."""
    if isinstance(result, Mapping) and "accuracy" in result:
        out = dict(result)
        if "per_class" not in out and len(out.get("predictions") or []) == len(gold):
            out["per_class"] = metrics.per_class(gold, [str(p) for p in out["predictions"]], labels)
        return out
    if hasattr(result, "accuracy"):
        return {k: getattr(result, k) for k in ("accuracy", "macro_f1", "per_class") if hasattr(result, k)}
    predicted = [str(p) for p in result]
    return _scores(gold, predicted, labels)


def classical_baseline(train: Pairs, test: Pairs, labels: list[str]) -> dict[str, Any]:
    """The project's `training.evaluate.baseline.tfidf_logreg` when it exists, else the same model inline;
    trained on `train` (the router's training utterances) and scored on `test` (the held-out set)."""
    gold = [y for _, y in test]
    started = time.perf_counter()
    if importlib.util.find_spec("training.evaluate.baseline") is not None:
        try:
            from training.evaluate.baseline import tfidf_logreg  # type: ignore[import-not-found,unused-ignore]

            result = tfidf_logreg(train, test, labels)
        except ImportError as exc:  # its scikit-learn import is inside the call
            raise BaselineUnavailable(f"training.evaluate.baseline needs scikit-learn ({exc}); run "
                                      ".venv/bin/pip install scikit-learn") from exc
        out = _from_project(result, gold, labels)
        out["implementation"] = "training.evaluate.baseline.tfidf_logreg"
    else:
        out = _scores(gold, _inline_tfidf_logreg(train, test), labels)
        out["implementation"] = "inline: tfidf word 1-2 + char_wb 2-5 (sublinear) + LogisticRegression(C=10)"
    out["seconds"] = round(time.perf_counter() - started, 2)
    out["train_examples"] = len(train)
    return out


# --- training and evaluation --------------------------------------------------------------------


def config_overrides(pairs: Sequence[str]) -> dict[str, Any]:
    """`--set KEY=VALUE` pairs as TrainConfig fields; keys TrainConfig does not have go to its `extra`
    (SFTConfig fields). Values are JSON when they parse as JSON (numbers, booleans, lists), else text."""
    from dataclasses import fields

    from training.train.sft import TrainConfig

    known = {f.name for f in fields(TrainConfig)}
    out: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--set wants KEY=VALUE, got {pair!r}")
        try:
            value: Any = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        if key == "target_modules" and isinstance(value, list):
            value = tuple(value)
        (out if key in known else extra)[key] = value
    if extra:
        out["extra"] = extra
    return out


def train_router(dataset: Path, run_name: str, runs_dir: Path, max_steps: int | None,
                 overrides: Mapping[str, Any] | None = None) -> Any:
    """A router with the project's default TrainConfig (plus `overrides`, for experiments). The run
    folder is removed first, so a stale checkpoint from an earlier, different sample is never resumed
    (and the time is a full run's)."""
    from training.train.sft import TrainConfig, train_adapter

    shutil.rmtree(runs_dir / run_name, ignore_errors=True)
    override: dict[str, Any] = dict(overrides or {})
    if max_steps:
        override["max_steps"] = max_steps
    config = TrainConfig(kind="router", dataset=dataset, run_name=run_name, runs_dir=runs_dir, overwrite=True,
                         **override)
    return train_adapter(config)


def temperature(report: Mapping[str, Any], metadata: Mapping[str, Any]) -> float | None:
    """The confidence temperature: from the evaluation report, else from the adapter's metadata."""
    value = (report.get("calibration") or {}).get("temperature")
    if value is None:
        value = (metadata.get("calibration") or {}).get("temperature")
    return float(value) if value is not None else None


def run_dataset(name: str, args: argparse.Namespace, kept_aside: bool) -> dict[str, Any]:
    """Sample, build, train, evaluate and compare one dataset; the result as a JSON-able dict."""
    from training.evaluate.router_and_experts import evaluate_router

    data = load(name, args.cache_dir)
    sample = sample_dataset(data, args.per_class, args.heldout, args.seed)
    if len(sample.labels) < 2:
        raise ValueError(f"{name}: {len(sample.labels)} label(s) have {args.per_class} + {args.heldout} distinct "
                         f"utterances; a router needs two (dropped: {sample.dropped})")
    folder = args.out / name
    shutil.rmtree(folder, ignore_errors=True)
    sources = write_sources(folder / "sources", sample.train, data)
    routing = build_routing_dataset(sources, folder / "routing", FRACTIONS, args.seed, BALANCE)
    heldout_counts = write_heldout_dataset(folder / "heldout",
                                           write_sources(folder / "heldout_sources", sample.heldout, data), data)
    started = time.perf_counter()
    trained = train_router(routing.path, f"router-{name}", args.out / "runs", args.max_steps, args.overrides)
    wall = time.perf_counter() - started
    report = evaluate_router(trained.final_dir, folder / "heldout").report
    train_pairs = split_pairs(routing.path / "train.jsonl")
    test_pairs = split_pairs(folder / "heldout" / "eval.jsonl")
    try:
        baseline: dict[str, Any] = classical_baseline(train_pairs, test_pairs, routing.labels)
    except (BaselineUnavailable, ValueError) as exc:  # the router's numbers stand without it
        print(f"[{name}] baseline skipped: {exc}", file=sys.stderr)
        baseline = {"error": str(exc)}
    train_metrics = trained.metadata.get("metrics", {})
    return {
        "dataset": name,
        "kept_aside": kept_aside,
        **data.summary(),
        "labels": routing.labels,
        "dropped_labels": sample.dropped,
        "counts": {"per_class": args.per_class, "routing_dataset": routing.counts, "heldout": heldout_counts,
                   "heldout_topped_up_from_pool": sample.heldout_from_pool, "baseline_train": len(train_pairs)},
        "train": {"seconds": round(trained.seconds, 1), "wall_seconds": round(wall, 1), "metrics": train_metrics,
                  "calibration": trained.metadata.get("calibration"),
                  "plan": trained.plan.to_json() if trained.plan else None, "adapter": str(trained.final_dir)},
        "router": report,
        "baseline": baseline,
        "temperature": temperature(report, trained.metadata),
        "router_minus_baseline": {k: report[k] - baseline[k] for k in ("accuracy", "macro_f1") if k in baseline},
    }


# --- output -------------------------------------------------------------------------------------

COLUMNS = ("dataset", "labels", "train", "held-out", "acc", "macro-F1", "ECE", "invalid", "train s", "steps",
           "T", "base acc", "base F1", "Δacc", "ΔF1")


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def table_row(result: Mapping[str, Any]) -> list[str]:
    """One dataset's line of the table (failed datasets show their error)."""
    if "error" in result:
        return [result["dataset"], f"FAILED: {result['error'].strip().splitlines()[-1][:80]}"] + [""] * 13
    report, base, delta = result["router"], result["baseline"], result["router_minus_baseline"]
    return [
        result["dataset"], str(len(result["labels"])), str(result["counts"]["baseline_train"]),
        str(sum(result["counts"]["heldout"].values())), _fmt(report["accuracy"]), _fmt(report["macro_f1"]),
        _fmt(report["calibration"]["ece"]), _fmt(report["invalid_name_rate"]), _fmt(result["train"]["seconds"], 0),
        _fmt(result["train"]["metrics"].get("steps")), _fmt(result["temperature"], 2), _fmt(base.get("accuracy")),
        _fmt(base.get("macro_f1")), _fmt(delta.get("accuracy"), 3), _fmt(delta.get("macro_f1"), 3),
    ]


def print_tables(results: Sequence[Mapping[str, Any]]) -> None:
    """Tuned-on datasets first, then the kept-aside ones under their own title."""
    from rich.console import Console
    from rich.table import Table

    console = Console() if sys.stdout.isatty() else Console(width=180)  # a log file is not 80 columns
    sections = (("router on real intent data", False), ("kept aside, never tuned on", True))
    for title, aside in sections:
        rows = [r for r in results if bool(r.get("kept_aside")) == aside]
        if not rows:
            continue
        table = Table(title=title)
        for column in COLUMNS:
            table.add_column(column, justify="left" if column == "dataset" else "right")
        for result in rows:
            table.add_row(*table_row(result))
        console.print(table)
    for result in results:
        if "labels" in result:
            dropped = ", ".join(result["dropped_labels"]) or "none"
            console.print(f"[bold]{result['dataset']}[/]: {', '.join(result['labels'])}  (dropped: {dropped})")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--datasets", default="snips,atis,kwik", help=f"comma list of {', '.join(LOADERS)}")
    parser.add_argument("--per-class", type=int, default=50, help="training utterances per intent")
    parser.add_argument("--heldout", type=int, default=40, help="held-out utterances per intent")
    parser.add_argument("--out", type=Path, default=Path("reports/router_real_data"))
    parser.add_argument("--max-steps", type=int, default=None, help="smoke runs only: overrides the training plan")
    parser.add_argument("--kept-aside", action="append", default=[], metavar="NAME",
                        help="a dataset never tuned on (repeatable or comma list): reported separately")
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="experiments only: a TrainConfig (or SFTConfig) field instead of its default")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE, help="where pip puts the packages")
    args = parser.parse_args(argv)
    args.datasets = [d.strip() for d in args.datasets.split(",") if d.strip()]
    args.kept_aside = {d.strip() for value in args.kept_aside for d in value.split(",") if d.strip()}
    unknown = [d for d in [*args.datasets, *args.kept_aside] if d not in LOADERS]
    if unknown:
        parser.error(f"unknown dataset(s) {unknown}; known: {', '.join(LOADERS)}")
    if args.kept_aside - set(args.datasets):
        parser.error(f"--kept-aside {sorted(args.kept_aside - set(args.datasets))} not in --datasets")
    try:
        args.overrides = config_overrides(args.overrides)
    except ValueError as exc:
        parser.error(str(exc))
    if args.per_class < 3 or args.heldout < 1:
        parser.error("--per-class must be >= 3 (train/val/eval) and --heldout >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    config = {"datasets": args.datasets, "per_class": args.per_class, "heldout": args.heldout, "seed": args.seed,
              "max_steps": args.max_steps, "fractions": list(FRACTIONS), "kept_aside": sorted(args.kept_aside),
              "train_config": "training.train.sft.TrainConfig defaults" + (" + max_steps" if args.max_steps else ""),
              "overrides": args.overrides}
    results: list[dict[str, Any]] = []
    for name in args.datasets:
        print(f"== {name}", flush=True)
        try:
            results.append(run_dataset(name, args, name in args.kept_aside))
        except Exception:  # one dataset failing must not lose the others' measurements
            error = traceback.format_exc()
            print(error, file=sys.stderr)
            results.append({"dataset": name, "kept_aside": name in args.kept_aside, "error": error})
        write_json(args.out / "results.json", {"config": config, "results": results})
    print_tables(results)
    print(f"results: {args.out / 'results.json'}")
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
