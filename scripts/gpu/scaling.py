"""Issue 24's measurements (scripts/gpu/scaling.sh): the check that N processes' merged outputs equal one process's,
and the tables.

    python scripts/gpu/scaling.py check ONE MANY     # MODEL-g1 and MODEL-gN: writes MANY/check.json, prints it
    python scripts/gpu/scaling.py table DIR          # DIR holds MODEL-tN and MODEL-gN projects: markdown tables

check: the test queries (generate/test/queries.jsonl, every field of every user's line) and the scored pools
(rerank/test-*/candidates.parquet: the same rows, log-probabilities within 1e-4) of MANY against ONE.
table: per model and GPU count, train tokens/s (the manifest's train metrics: the global batch's tokens over the
time in training steps), its ratio to N x one GPU's (scaling efficiency), validation loss per epoch, `gloss train`'s
wall time; generation users/s and scoring users/s (each loop with the model loaded; the stage's whole wall time
beside it) with their efficiency, and the check's verdict.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

import polars as pl

LOGPROB_TOLERANCE = 1e-4  # the same batches on the same kind of GPU: bf16 kernels agree far closer than this


def _stages(project: Path) -> dict[str, Any]:
    return json.loads((project / "manifest.json").read_text())["stages"]


def _pools(project: Path) -> Path:
    (path,) = sorted(project.glob("rerank/test-*/candidates.parquet"))
    return path


def check(one: Path, many: Path) -> dict[str, Any]:
    def lines(project: Path) -> dict[str, str]:
        rows = (project / "generate/test/queries.jsonl").read_text().splitlines()
        return {json.loads(row)["user_id"]: row for row in rows}

    a, b = lines(one), lines(many)
    same_queries = sum(1 for user, row in a.items() if b.get(user) == row)
    key = ["user_id", "item_id", "pool_rank"]
    pa = pl.read_parquet(_pools(one)).sort(key)
    pb = pl.read_parquet(_pools(many)).sort(key)
    same_rows = pa.height == pb.height and pa.select(key).equals(pb.select(key))
    gap = float((pa["logprob"] - pb["logprob"]).abs().max() or 0.0) if same_rows else None
    result = {
        "one": str(one),
        "many": str(many),
        "users": len(a),
        "users_many": len(b),
        "queries_identical": same_queries,
        "pool_rows": pa.height,
        "pool_rows_identical": same_rows,
        "logprob_max_abs_diff": gap,
        "equal": len(a) == len(b) == same_queries and same_rows and gap is not None and gap <= LOGPROB_TOLERANCE,
    }
    (many / "check.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def _users_per_s(metrics: dict[str, Any]) -> float:
    """Users per second of the generation or scoring loop itself, with the model loaded. Under torchrun, generate's
    stage seconds also hold each process's model load and the merge, so its rate is taken from the slowest process's
    own loop (its ``ranks``), as one process's is; rerank's seconds are its scoring loop either way."""
    ranks = metrics.get("ranks")
    if ranks:
        return float(metrics["users_new"]) / max(float(r["seconds"]) for r in ranks)
    return float(metrics.get("users_per_s") or metrics["users"] / metrics["seconds"])


def table(root: Path) -> str:
    runs: dict[str, dict[int, dict[str, Path]]] = {}
    for project in sorted(root.iterdir()):
        match = re.fullmatch(r"(.+)-([tg])(\d+)", project.name)
        if match and (project / "manifest.json").exists():
            model, kind, n = match.group(1), match.group(2), int(match.group(3))
            runs.setdefault(model, {}).setdefault(n, {})[kind] = project
    out = [
        "| model | GPUs | train tokens/s | efficiency | validation loss per epoch | `gloss train` wall s "
        "| generate users/s (wall) | efficiency | rerank users/s (wall) | efficiency | outputs equal one GPU's |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for model, by_n in runs.items():
        base: dict[str, float] = {}
        for n in sorted(by_n):
            cells = [model, str(n)]
            train = _stages(by_n[n]["t"]).get("train") if "t" in by_n[n] else None
            if train:
                rate = float(train["metrics"]["tokens_per_s"])
                base.setdefault("train", rate)
                losses = " → ".join(f"{e['val_loss']:.3f}" for e in train["metrics"]["losses"])
                cells += [f"{rate:,.0f}", f"{rate / (n * base['train']):.2f}", losses, f"{train['duration_s']:.0f}"]
            else:
                cells += ["", "", "", ""]
            stages = _stages(by_n[n]["g"]) if "g" in by_n[n] else {}
            for name in ("generate/test", "rerank"):
                stage = next((v for k, v in stages.items() if k.startswith(name)), None)
                if stage is None:
                    cells += ["", ""]
                    continue
                rate = _users_per_s(stage["metrics"])
                base.setdefault(name, rate)
                cells += [f"{rate:,.1f} ({stage['duration_s']:.0f} s)", f"{rate / (n * base[name]):.2f}"]
            verdict = by_n[n].get("g", Path("-")) / "check.json"
            if n == 1:
                cells.append("(baseline)")
            elif verdict.exists():
                cells.append("yes" if json.loads(verdict.read_text())["equal"] else "**no**")
            else:
                cells.append("")
            out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    c = sub.add_parser("check")
    c.add_argument("one", type=Path)
    c.add_argument("many", type=Path)
    t = sub.add_parser("table")
    t.add_argument("root", type=Path)
    args = ap.parse_args()
    if args.command == "check":
        result = check(args.one, args.many)
        print(json.dumps(result, indent=2))
        sys.exit(0 if result["equal"] else 1)
    print(table(args.root))


if __name__ == "__main__":
    main()
