"""Latency of `gloss recommend`: seconds per user with the model and the index loaded once (issue target: a median
of at most 1.5 s per user after warm-up, on 2 CPU cores, with the default model, 5 beams x 5 returns, <= 50 new
tokens, a BM25 or MiniLM index). ``--recipe`` (default ``model``: the model's 5 queries, fused, history excluded, the
recipe benchmarks/README.md measured, gloss recommend's default before recipes) takes any retrieval-order recipe, e.g.
``--recipe gloss`` (gloss recommend's default today: the transitions list, the last item's title and the model's
first 2 queries).

It drives the same :class:`gloss_cli.recommend.Recommender` that ``gloss recommend`` uses, on a trained project:
loads it once, recommends for ``--warmup`` users (not timed), then for ``--n`` users one at a time (each call timed
on its own, as a person would ask), and prints the median and 90th percentile of the whole call and of its parts
(prompt building, beam search, retrieval and fusion), plus the load time. Users are test users in user_id order,
skipping the warm-up ones; their full histories are the prompts (left-truncated to the model's max_seq_len).

    python benchmarks/recommend.py --project runs/cpu-beauty --n 20
    python benchmarks/recommend.py --project runs/cpu-beauty --retriever minilm --backend hf
    python benchmarks/recommend.py --project runs/cpu-beauty --recipe gloss
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def quantile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--project", type=Path, required=True, help="a trained gloss project")
    parser.add_argument("--n", type=int, default=20, help="users timed")
    parser.add_argument("--warmup", type=int, default=2, help="users recommended for first, not timed")
    parser.add_argument("--retriever", default="bm25", help="bm25 or a dense retriever (minilm, e5, ...)")
    parser.add_argument("--backend", default=None, help="llama-cpp or hf (default: gloss recommend's)")
    parser.add_argument("-k", type=int, default=10, help="items per user")
    parser.add_argument("--recipe", default="model", help="a recipe (gloss recipes lists the presets)")
    args = parser.parse_args(argv)

    import polars as pl
    import torch

    from gloss_cli.project import Project
    from gloss_cli.recipe import parse
    from gloss_cli.recommend import Recommender

    project = Project(args.project)
    recipe = parse(args.recipe)
    t0 = time.perf_counter()
    rec = Recommender(project, recipe=recipe, retriever=args.retriever, backend=args.backend, k=args.k)
    load = time.perf_counter() - t0
    users = pl.read_parquet(project.path("data/test.parquet"), columns=["user_id"]).sort("user_id")
    ids = users.get_column("user_id").head(args.warmup + args.n).to_list()
    for user in ids[: args.warmup]:
        rec.for_users([user])
    totals: list[float] = []
    parts: dict[str, list[float]] = {}
    lengths: list[int] = []
    for user in ids[args.warmup :]:
        t1 = time.perf_counter()
        (result,) = rec.for_users([user])
        totals.append(time.perf_counter() - t1)
        lengths.append(len(result.history))
        for key, value in result.timings.items():
            parts.setdefault(key, []).append(value)

    backend = rec.options.backend
    print(
        f"{len(totals)} users (test users by user_id after {args.warmup} warm-up), recipe {recipe.name()}, "
        f"backend {backend}, retriever {args.retriever}, k {args.k}, torch threads {torch.get_num_threads()}, "
        f"history length median {statistics.median(lengths):.0f} items; load {load:.1f} s",
        file=sys.stderr,
    )
    print("| part | median s | p90 s |")
    print("|---|---|---|")
    for key, values in [*parts.items(), ("total (one call)", totals)]:
        print(f"| {key} | {statistics.median(values):.3f} | {quantile(values, 0.9):.3f} |")


if __name__ == "__main__":
    main()
