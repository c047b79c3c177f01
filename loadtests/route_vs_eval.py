"""Does a running service route exactly as `loramux eval` reported? (`python -m loadtests.route_vs_eval`)

Sends every example of a routing dataset's eval split through `POST /route` of a live server and
compares the decisions with an evaluation report of the same router (`report.json` from
`loramux eval` or the demo's `reports/demo_<stamp>/router/`): confusion matrix cell by cell,
accuracy, the confidence of every misrouted example, and that each answer's probabilities sum to 1.
The test suite checks the same on a small router; this runs it on the real demo in minutes.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import httpx

from training.data.chats import read_chats
from training.evaluate import metrics
from training.evaluate.router_and_experts import router_gold


def compare(url: str, dataset: Path, report: dict, api_key: str | None = None) -> dict:
    records = read_chats(dataset / "eval.jsonl")
    labels = list(report["labels"])
    headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
    gold, predicted, confidence, worst_sum = [], [], {}, 0.0
    started = time.perf_counter()
    with httpx.Client(base_url=url, timeout=120, headers=headers) as client:
        for record in records:
            response = client.post("/route", json={"messages": [{"role": "user", "content": record.user_text}]})
            response.raise_for_status()
            body = response.json()
            worst_sum = max(worst_sum, abs(sum(c["probability"] for c in body["candidates"]) - 1.0))
            gold.append(router_gold(record))
            predicted.append(body["adapter"])
            confidence[record.user_text] = body["confidence"]
    seconds = time.perf_counter() - started
    confusion = metrics.confusion_matrix(gold, predicted, labels)
    confidence_gaps = [abs(confidence[e["text"]] - e["confidence"]) for e in report.get("errors", [])]
    return {
        "examples": len(records),
        "accuracy_route": metrics.accuracy(gold, predicted),
        "accuracy_eval": report["accuracy"],
        "confusion_equal": confusion == report["confusion"],
        "max_confidence_gap_on_errors": max(confidence_gaps, default=0.0),
        "max_probability_sum_error": worst_sum,
        "route_ms_mean": 1000 * seconds / max(1, len(records)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--dataset", type=Path, required=True, help="routing dataset folder (eval.jsonl)")
    parser.add_argument("--report", type=Path, required=True, help="the router's evaluation report.json")
    parser.add_argument("--api-key", default=None)
    args = parser.parse_args()
    report = json.loads(args.report.read_text())
    result = compare(args.url, args.dataset, report, args.api_key)
    for key, value in result.items():
        print(f"{key:32s} {value}")
    same = (result["confusion_equal"] and result["accuracy_route"] == result["accuracy_eval"]
            and math.isclose(result["max_confidence_gap_on_errors"], 0.0, abs_tol=2e-3)
            and result["max_probability_sum_error"] < 1e-6)
    print("MATCH" if same else "MISMATCH")
    sys.exit(0 if same else 1)


if __name__ == "__main__":
    main()
