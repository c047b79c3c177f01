"""The stacked evaluation's report for people: a terminal table, `examples.jsonl` and `stacked.png`.

The headline puts the three scores side by side (end to end with the router's choices, the oracle with
the true experts, the bare base model) with the routing accuracy, and says where the gap went: every
request is answered right, lost to routing or lost by its expert, and the three counts add up to n.
The per-expert table shows each expert as a destination (traffic routed to it, precision) and as a
worker (its requests' end-to-end and oracle scores), the two views a router and an expert are judged on.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from training.data.chats import write_json, write_jsonl
from training.evaluate.reports import _pyplot, _save, _table, pct


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} ms"


def _score(value: float | None) -> str:
    return "-" if value is None else pct(value)


def stacked_text(report: dict[str, Any]) -> str:
    outcomes, latency = report["outcomes"], report["latency_ms"]
    lines = [
        f"stacked: router {report['router']['name']} -> experts {', '.join(report['experts'])} "
        f"({report['backend']})",
        f"  {report['n']} {report['split']} examples from {report['dataset']}",
        f"  routing accuracy {pct(report['routing_accuracy'])}   end to end {pct(report['end_to_end'])}   "
        f"oracle {pct(report['oracle'])}   base {pct(report['base'])}",
        f"  of {report['n']}: {outcomes['correct']} answered right, {outcomes['lost_to_routing']} lost to routing, "
        f"{outcomes['lost_by_expert']} lost by the expert ({report['misrouted']} misrouted, "
        f"{report['rescued']} of them right anyway)",
        f"  latency: route p50 {_ms(latency['route']['p50'])} p95 {_ms(latency['route']['p95'])}, "
        f"answer p50 {_ms(latency['answer']['p50'])} p95 {_ms(latency['answer']['p95'])}",
        "",
    ]
    rows = [[name, v["support"], v["routed_to"], f"{v['precision']:.3f}", _score(v["end_to_end"]),
             _score(v["oracle"]), _score(v["base"]), v["metric"] or "-"]
            for name, v in report["per_expert"].items()]
    lines.append(_table(["expert", "requests", "routed to", "precision", "end to end", "oracle", "base", "metric"],
                        rows))
    return "\n".join(lines)


def plot_stacked(report: dict[str, Any], path: Path) -> Path:
    """Per expert (and overall): end-to-end, oracle and base scores as grouped bars."""
    plt = _pyplot()
    names = [*report["per_expert"], "all"]
    series = {key: [v[key] or 0.0 for v in report["per_expert"].values()] + [report[key]]
              for key in ("end_to_end", "oracle", "base")}
    fig, ax = plt.subplots(figsize=(max(5.0, 1.1 * len(names) + 2), 4))
    width = 0.27
    for offset, (key, values) in enumerate(series.items()):
        ax.bar([i + (offset - 1) * width for i in range(len(names))], values, width=width,
               label=key.replace("_", " "))
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("score")
    ax.set_title(f"stacked: routing {pct(report['routing_accuracy'])}, end to end {pct(report['end_to_end'])}, "
                 f"oracle {pct(report['oracle'])} (n={report['n']})", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def summary(report: dict[str, Any]) -> dict[str, Any]:
    """The report without its per-example records (they go to examples.jsonl)."""
    return {k: v for k, v in report.items() if k != "examples"}


def write_stacked_report(report: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "report.json", "examples": out_dir / "examples.jsonl"}
    write_json(paths["json"], {**summary(report), "examples_file": paths["examples"].name})
    write_jsonl(paths["examples"], report["examples"])
    paths["png"] = plot_stacked(report, out_dir / "stacked.png")
    (out_dir / "report.txt").write_text(stacked_text(report) + "\n")
    return paths
