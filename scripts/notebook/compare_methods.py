"""Training methods side by side (issue 21: QLoRA, LoRA, full fine-tuning), from projects that
scripts/notebook/evaluate_returned.sh (or `gloss eval --recipe R --name R` per recipe) evaluated on the CPU:

    python scripts/notebook/compare_methods.py PROJECT... [--recipes paper,gloss,no-model,lis-paper]

Prints one markdown row per project (train tokens/s, peak CUDA memory, validation loss per epoch, train seconds, the
test Recall@5 / NDCG@5 of each recipe: its run under eval/RECIPE) and the paired 95 % bootstrap CI of every pair's
difference per recipe, on the users both runs scored (gloss_cli.metrics.paired_difference, as `gloss run` does).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import polars as pl

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from gloss_cli.metrics import paired_difference


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("projects", nargs="+", type=Path)
    ap.add_argument("--recipes", default="paper,gloss,no-model,lis-paper")
    args = ap.parse_args()
    recipes = args.recipes.split(",")
    print(
        "| run | method | train tokens/s | peak CUDA memory | validation loss per epoch | train s | "
        + " | ".join(f"`{r}` R@5 / N@5" for r in recipes)
        + " |"
    )
    print("|---" * (6 + len(recipes)) + "|")
    for p in args.projects:
        train = json.loads((p / "manifest.json").read_text())["stages"]["train"]
        m = train.get("metrics", train)
        method = json.loads((p / "train" / "meta.json").read_text())["method"]
        cells = []
        for r in recipes:
            f = p / "eval" / r / "metrics.json"
            mm = json.loads(f.read_text()).get("metrics", {}) if f.exists() else {}
            cells.append(f"{mm['recall@5']:.4f} / {mm['ndcg@5']:.4f}" if mm else "")
        peak = m.get("gpu_peak_mib")
        print(
            f"| {p.name} | {method} | {m['tokens_per_s']:,.0f} | "
            + (f"{peak / 1024:.1f} GiB" if peak else "no GPU")
            + " | "
            + " → ".join(f"{e['val_loss']:.3f}" for e in m["losses"])
            + f" | {sum(e['seconds'] for e in m['losses']):.0f} | "
            + " | ".join(cells)
            + " |"
        )
    print("\n| recipe: A - B | users | Recall@5 | NDCG@5 |\n|---|---|---|---|")
    for r in recipes:
        for a, b in itertools.combinations(args.projects, 2):
            fa, fb = (p / "eval" / r / "per_user.parquet" for p in (a, b))
            if not (fa.exists() and fb.exists()):
                continue
            both = pl.read_parquet(fa).join(pl.read_parquet(fb), on="user_id", suffix="_b")
            diffs = [paired_difference(both[k].to_numpy(), both[f"{k}_b"].to_numpy()) for k in ("recall@5", "ndcg@5")]
            print(
                f"| {r}: {a.name} - {b.name} | {both.height:,} | "
                + " | ".join(f"{d['diff']:+.4f} [{d['lo']:+.4f}, {d['hi']:+.4f}]" for d in diffs)
                + " |"
            )


if __name__ == "__main__":
    main()
