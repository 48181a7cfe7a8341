"""Pick one LIS + model configuration per dataset on the validation split, across runs (docs/RESULTS.md).

Every candidate is an evaluation that scripts/notebook/evaluate_returned.sh wrote in a project:
`lis{2,5}-{retriever}-val`
(`gloss eval --split validation --recipe "lists=lis,model queries=N"`: LIS + the model's first N queries, fused,
history excluded; runs evaluated before recipes, issue 20, ranked the same under the same names). The candidate with
the highest validation Recall@5 is the pick (the earlier run wins a tie); its test row, `lis{N}-{retriever}-test`,
is the number to report. Prints a Markdown table of every candidate with the test rows that exist:

    python3 scripts/notebook/pick_on_validation.py "SmolLM2=runs/toys" "Qwen 0.5B=runs/qwen-toys" [--retrievers bm25 e5]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

NAMES = {"bm25": "BM25", "minilm": "MiniLM", "e5": "e5*"}


def metrics(project: Path, run: str) -> dict[str, Any] | None:
    path = project / "eval" / run / "metrics.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="LABEL=PROJECT, in the order that breaks ties")
    parser.add_argument("--retrievers", nargs="+", default=list(NAMES), choices=list(NAMES))
    args = parser.parse_args()
    runs = []
    for spec in args.runs:
        label, sep, folder = spec.partition("=")
        if not sep or not Path(folder, "manifest.json").is_file():
            print(f"error: '{spec}' is not LABEL=PROJECT with a gloss project there", file=sys.stderr)
            return 1
        runs.append((label, Path(folder)))
    rows, best = [], None
    for label, project in runs:
        for retriever in args.retrievers:
            for beams in (2, 5):
                val = metrics(project, f"lis{beams}-{retriever}-val")
                test = metrics(project, f"lis{beams}-{retriever}-test")
                recall = val["metrics"]["recall@5"] if val else None
                rows.append((label, retriever, beams, recall, test))
                if recall is not None and (best is None or recall > best[0]):
                    best = (recall, label, retriever, beams)
    print("| run | retriever | beams | validation R@5 | test R@5 [95% CI] | test NDCG@5 |")
    print("|---|---|---|---|---|---|")
    for label, retriever, beams, recall, test in rows:
        bold = "**" if best is not None and best[1:] == (label, retriever, beams) else ""
        shown = f"{bold}{recall:.4f}{bold}" if recall is not None else "not evaluated"
        if test:
            low, high = test["ci95"]["recall@5"]
            result = f"{test['metrics']['recall@5']:.4f} [{low:.4f}, {high:.4f}] | {test['metrics']['ndcg@5']:.4f}"
        else:
            result = " | "
        print(f"| {bold}{label}{bold} | {NAMES[retriever]} | {beams} | {shown} | {result} |")
    if best is None:
        print("error: no validation candidate (lis{2,5}-RETRIEVER-val) in these projects", file=sys.stderr)
        return 1
    recall, label, retriever, beams = best
    print(f"\nvalidation picks: {label}, {NAMES[retriever]}, {beams} beams (validation Recall@5 {recall:.4f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
