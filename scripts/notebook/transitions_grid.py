"""The validation-only search that chose gloss_cli.transitions' settings (docs/notebook/2026-11-30-session-10.md).

    python3 scripts/notebook/transitions_grid.py PROJECT [RETRIEVER]

(a project with 'gloss generate --split validation')

For each setting (window 1 or 3; forward pairs only, or both directions; the 1, 3, 5 or 10 most recent history
items, each older one's votes times the decay; with or without dividing by the next item's popularity ** 0.5) it
prints the validation Recall@5 of the transitions list alone, and fused at position 0, 1 or 2 among the lists of
LIS + 2 beams (fused, history excluded: gloss eval --recipe "lists=lis,model queries=2"). Validation only: the test
split is never read.
"""

import sys
from pathlib import Path

import numpy as np
import polars as pl

from gloss_cli.console import Reporter
from gloss_cli.data import load_items, load_split
from gloss_cli.evaluate import with_lis_query
from gloss_cli.index import open_index
from gloss_cli.project import Project
from gloss_cli.queries import load_generated
from gloss_cli.ranking import merge_user

K, DEPTH = 5, 105
project = Project(Path(sys.argv[1]))
retriever = sys.argv[2] if len(sys.argv) > 2 else "bm25"
items = load_items(project.path("data"))
ids = items["item_id"].to_list()
key_of = {item: k for k, item in enumerate(ids)}
titles = dict(zip(ids, items["title"].to_list(), strict=True))
train = load_split(project.path("data"), "train")
steps = (
    train.select("user_id", s=pl.concat_list(pl.col("history"), pl.col("target")))
    .with_columns(pos=pl.int_ranges(0, pl.col("s").list.len()))
    .explode("s", "pos")
)
split = load_split(project.path("data"), "validation")
qs = load_generated(project.path("generate/validation/queries.jsonl"), split, titles, "generate/validation", 2)
qs = with_lis_query(qs, titles)
index, _ = open_index(project, retriever, query_cache=True, reporter=Reporter())
users = len(qs.users)
keys, _ = index.search([t for q in qs.queries for t in q], DEPTH)
keys = keys.reshape(users, qs.per_user, -1)
seen = [{key_of[i] for i in h} for h in qs.histories]
target = [key_of[t] for t in qs.targets]
votes = (
    pl.DataFrame({"u": range(users), "h": qs.histories})
    .with_columns(r=pl.int_ranges(pl.col("h").list.len(), 0, -1) - 1)
    .explode("h", "r")
)


def pairs(window: int, both: bool) -> pl.DataFrame:
    out = []
    for gap in range(1, window + 1):
        after = steps.with_columns(pos=pl.col("pos") - gap).rename({"s": "j"})
        p = steps.join(after, on=["user_id", "pos"]).select(i="s", j="j", w=pl.lit(1.0 / gap))
        out += [p, p.select(i="j", j="i", w="w")] if both else [p]
    return pl.concat(out).group_by("i", "j").agg(pl.col("w").sum())


def lists(p: pl.DataFrame, recent: int, decay: float, alpha: float) -> list[list[int]]:
    if alpha:
        popularity = p.group_by("j").agg(d=pl.col("w").sum())
        p = p.join(popularity, on="j").with_columns(w=pl.col("w") / pl.col("d") ** alpha).drop("d")
    s = (
        votes.filter(pl.col("r") < recent)
        .join(p, left_on="h", right_on="i")
        .with_columns(w=pl.col("w") * decay ** pl.col("r"))
        .group_by("u", "j")
        .agg(pl.col("w").sum())
        .join(votes.select("u", j="h").unique(), on=["u", "j"], how="anti")
        .sort(["u", "w", "j"], descending=[False, True, False])
        .group_by("u", maintain_order=True)
        .head(DEPTH)
        .group_by("u", maintain_order=True)
        .agg("j")
    )
    found = dict(zip(s["u"].to_list(), s["j"].to_list(), strict=True))
    return [[key_of[x] for x in found.get(u, [])] for u in range(users)]


def recall(ranked: list[list[int]]) -> float:
    return float(np.mean([t in r[:K] for t, r in zip(target, ranked, strict=True)]))


def fused(extra: list[list[int]] | None, position: int) -> list[list[int]]:
    out = []
    for u in range(users):
        rows = [keys[u, q] for q in range(qs.per_user)]
        if extra is not None:
            row = np.full(keys.shape[2], -1)
            row[: len(extra[u][:DEPTH])] = extra[u][:DEPTH]
            rows.insert(position, row)
        merged = merge_user(
            np.stack(rows), np.zeros((len(rows), keys.shape[2]), np.float32), seen[u], merge="rrf", depth=K
        )
        out.append([k for k, _, _ in merged[:K]])
    return out


print(f"{project.root.name}, {retriever}, validation, {users:,} users; LIS + 2 beams: {recall(fused(None, 0)):.4f}")
print("window both recent decay alpha | alone | fused at 0, 1, 2")
for window, both in [(1, False), (1, True), (3, True), (3, False)]:
    p = pairs(window, both)
    for recent, decay in [(1, 1.0), (3, 0.5), (5, 0.5), (10, 0.7)]:
        for alpha in (0.0, 0.5):
            ranked = lists(p, recent, decay, alpha)
            row = " ".join(f"{recall(fused(ranked, pos)):.4f}" for pos in (0, 1, 2))
            print(f"{window} {both!s:5} {recent:2} {decay} {alpha} | {recall(ranked):.4f} | {row}", flush=True)
