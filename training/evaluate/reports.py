"""Evaluation reports for people: terminal tables, `report.json` and PNGs (for routers: the confusion
matrix, the reliability diagram and the coverage/accuracy curve over the routing threshold)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from training.data.chats import write_json


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    cells = [headers, *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    line = "  ".join("-" * w for w in widths)
    out = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)), line]
    for row in cells[1:]:
        out.append("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))))
    return "\n".join(out)


def pct(value: float) -> str:
    return f"{100 * value:.1f}%"


CURVE_ROWS = (0.0, 0.5, 0.7, 0.8, 0.9, 0.95, 0.99)  # thresholds of the curve shown in the text report


def router_text(report: dict[str, Any]) -> str:
    calibration = report["calibration"]
    lines = [
        f"router {report['adapter']}",
        f"  {report['examples']} {report['split']} examples from {report['dataset']}",
        f"  accuracy {pct(report['accuracy'])}   macro F1 {report['macro_f1']:.3f}   "
        f"ECE {calibration['ece']:.4f}   "
        f"invalid names {pct(report['invalid_name_rate'])} (constrained), "
        f"{pct(report['free_generation']['invalid_name_rate'])} (free generation)",
        f"  calibration: temperature {calibration.get('temperature', 1.0):g}   Brier {calibration['brier']:.4f}   "
        f"mean confidence {calibration['mean_confidence']:.3f}   "
        f"latency p50 {report['latency_ms']['p50']:.1f} ms",
    ]
    baseline = report.get("baseline")
    if baseline:
        lines.append(
            f"  router vs baseline: accuracy {pct(report['accuracy'])} vs {pct(baseline['accuracy'])} "
            f"({baseline['name']}, trained on {baseline.get('train_examples', '?')} examples in "
            f"{baseline['train_seconds']:.2f} s; macro F1 {baseline['macro_f1']:.3f}, ECE {baseline['ece']:.4f})")
    elif "baseline" in report:
        lines.append("  router vs baseline: no baseline (the dataset has no train split to fit it on)")
    lines.append("")
    rows = [
        [label, f"{v['precision']:.3f}", f"{v['recall']:.3f}", f"{v['f1']:.3f}", v["support"]]
        for label, v in report["per_class"].items()
    ]
    lines += [_table(["adapter", "precision", "recall", "F1", "support"], rows), ""]
    curve = [p for p in report.get("threshold_curve", []) if p["threshold"] in CURVE_ROWS]
    if curve:
        rows = [[f"{p['threshold']:.2f}", pct(p["coverage"]), "-" if p["accuracy"] is None else pct(p["accuracy"])]
                for p in curve]
        lines += ["routing threshold (LORAMUX_ROUTE_THRESHOLD): coverage = share routed, the rest go to the fallback",
                  _table(["threshold", "coverage", "accuracy"], rows), ""]
    confusion = report["confusion"]
    rows = [[label, *row] for label, row in zip(confusion["labels"], confusion["matrix"], strict=True)]
    lines += ["confusion (rows: gold, columns: predicted)", _table(["", *confusion["columns"]], rows)]
    return "\n".join(lines)


def expert_text(report: dict[str, Any]) -> str:
    lines = [
        f"expert {report['adapter']}",
        f"  {report['examples']} {report['split']} examples from {report['dataset']}",
        f"  exact match {pct(report['exact_match'])}   valid tool calls {pct(report['valid_tool_call_rate'])}",
        "",
    ]
    rows = [[k, v["examples"], pct(v["exact_match"]), pct(v["valid"])] for k, v in report["per_tool"].items()]
    lines.append(_table(["tool", "examples", "exact", "valid"], rows))
    return "\n".join(lines)


def report_text(report: dict[str, Any]) -> str:
    if report["kind"] == "stacked":
        from training.evaluate.stacked_report import stacked_text

        return stacked_text(report)
    return router_text(report) if report["kind"] == "router" else expert_text(report)


def plot_confusion(report: dict[str, Any], path: Path) -> Path:
    plt = _pyplot()
    confusion = report["confusion"]
    matrix = confusion["matrix"]
    size = max(4.0, 0.7 * len(confusion["columns"]) + 2)
    fig, ax = plt.subplots(figsize=(size, size * 0.85))
    image = ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(confusion["columns"])), confusion["columns"], rotation=45, ha="right")
    ax.set_yticks(range(len(confusion["labels"])), confusion["labels"])
    ax.set_xlabel("predicted")
    ax.set_ylabel("gold")
    peak = max((max(row) for row in matrix), default=0)
    for i, row in enumerate(matrix):
        for j, value in enumerate(row):
            ax.text(j, i, str(value), ha="center", va="center", color="white" if value > peak / 2 else "black")
    ax.set_title(f"router accuracy {pct(report['accuracy'])} (n={report['examples']})")
    fig.colorbar(image, ax=ax, fraction=0.046)
    return _save(fig, path)


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    return path


def plot_reliability(report: dict[str, Any], path: Path) -> Path:
    """Reliability diagram: per confidence bin, accuracy against mean confidence (on the diagonal when
    calibrated), with the bin counts below."""
    plt = _pyplot()
    calibration = report["calibration"]
    bins = [b for b in calibration["bins"] if b["count"]]
    fig, (ax, counts) = plt.subplots(2, 1, figsize=(5.5, 6.5), sharex=True, height_ratios=(3, 1))
    ax.plot([0, 1], [0, 1], linestyle="--", color="gray", label="perfectly calibrated")
    widths = [b["bin"][1] - b["bin"][0] for b in calibration["bins"]]
    centers = [(b["bin"][0] + b["bin"][1]) / 2 for b in calibration["bins"]]
    ax.bar([(b["bin"][0] + b["bin"][1]) / 2 for b in bins], [b["accuracy"] for b in bins],
           width=[b["bin"][1] - b["bin"][0] for b in bins], alpha=0.35, edgecolor="tab:blue", label="accuracy")
    ax.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], marker="o", linestyle="none",
            color="tab:blue", label="accuracy at mean confidence")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.set_title(f"reliability: ECE {calibration['ece']:.4f}, T={calibration.get('temperature', 1.0):g} "
                 f"(n={report['examples']})")
    ax.legend(loc="upper left", fontsize=8)
    counts.bar(centers, [b["count"] for b in calibration["bins"]], width=widths, color="tab:gray")
    counts.set_xlabel("confidence")
    counts.set_ylabel("examples")
    return _save(fig, path)


def plot_threshold_curve(report: dict[str, Any], path: Path) -> Path:
    """Coverage (share routed rather than sent to the fallback) and accuracy among the routed, against
    the routing threshold."""
    plt = _pyplot()
    curve = report["threshold_curve"]
    thresholds = [p["threshold"] for p in curve]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(thresholds, [p["coverage"] for p in curve], marker=".", label="coverage (routed)")
    ax.plot(thresholds, [float("nan") if p["accuracy"] is None else p["accuracy"] for p in curve], marker=".",
            label="accuracy of the routed")
    baseline = report.get("baseline")
    if baseline:
        ax.axhline(baseline["accuracy"], linestyle=":", color="gray", label=f"{baseline['name']} accuracy")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("threshold (LORAMUX_ROUTE_THRESHOLD)")
    ax.set_title(f"router coverage and accuracy by threshold (n={report['examples']})")
    ax.legend(loc="lower left", fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def write_report(report: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    """report.json and report.txt in `out_dir`, and for routers confusion.png, reliability.png and
    threshold_curve.png (stacked evaluations: `training.evaluate.stacked_report`); returns the written paths."""
    if report["kind"] == "stacked":
        from training.evaluate.stacked_report import write_stacked_report

        return write_stacked_report(report, out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "report.json"}
    write_json(paths["json"], report)
    if report["kind"] == "router":
        paths["png"] = plot_confusion(report, out_dir / "confusion.png")
        paths["reliability"] = plot_reliability(report, out_dir / "reliability.png")
        if report.get("threshold_curve"):
            paths["threshold_curve"] = plot_threshold_curve(report, out_dir / "threshold_curve.png")
    (out_dir / "report.txt").write_text(report_text(report) + "\n")
    return paths
