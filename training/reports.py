"""Evaluation reports for people: terminal tables, `report.json` and a confusion-matrix PNG."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from training.chats import write_json


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


def router_text(report: dict[str, Any]) -> str:
    lines = [
        f"router {report['adapter']}",
        f"  {report['examples']} {report['split']} examples from {report['dataset']}",
        f"  accuracy {pct(report['accuracy'])}   macro F1 {report['macro_f1']:.3f}   "
        f"invalid names {pct(report['invalid_name_rate'])} (constrained), "
        f"{pct(report['free_generation']['invalid_name_rate'])} (free generation)",
        f"  calibration: ECE {report['calibration']['ece']:.4f}   Brier {report['calibration']['brier']:.4f}   "
        f"mean confidence {report['calibration']['mean_confidence']:.3f}   "
        f"latency p50 {report['latency_ms']['p50']:.1f} ms",
        "",
    ]
    rows = [
        [label, f"{v['precision']:.3f}", f"{v['recall']:.3f}", f"{v['f1']:.3f}", v["support"]]
        for label, v in report["per_class"].items()
    ]
    lines += [_table(["adapter", "precision", "recall", "F1", "support"], rows), ""]
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
    return router_text(report) if report["kind"] == "router" else expert_text(report)


def plot_confusion(report: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(report: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    """report.json (+ confusion.png for routers) in `out_dir`; returns the written paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "report.json"}
    write_json(paths["json"], report)
    if report["kind"] == "router":
        paths["png"] = plot_confusion(report, out_dir / "confusion.png")
    (out_dir / "report.txt").write_text(report_text(report) + "\n")
    return paths
