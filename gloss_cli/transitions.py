"""Item-to-item transitions: what followed the user's recent items in the training sequences.

A non-parametric, collaborative baseline and candidate source beside the language model: the sequential rules
("SR") of Ludewig & Jannach (2018, "Evaluation of session-based recommendation algorithms"). Every training
sequence (a train example's history, then its target: exactly what ``gloss train`` learns from, so neither a
validation nor a test item is ever counted) adds ``1 / d`` to the pair (item, the item ``d`` places after it) for
``d`` up to ``WINDOW``. A user's score for an item sums those weights over their ``RECENT`` most recent history items,
the most recent weighted 1, the one before ``DECAY``, then ``DECAY**2``, and so on.

The defaults were chosen on the validation split of session 9's runs (docs/notebook/2026-11-30-session-10.md): among
windows 1 and 3, forward-only or both directions, 1, 3, 5 or 10 recent items, with or without a popularity
correction, this one was the best or near it on all three datasets.
"""

from __future__ import annotations

import polars as pl

WINDOW = 3  # pairs up to 3 places apart, weighted 1, 1/2, 1/3
RECENT = 5  # the user's 5 most recent items vote
DECAY = 0.5  # each older one counts half the one after it
ROUND = 6  # decimals kept of a score: equal scores tie (then the item id decides) whatever order they were added in
# With the defaults every score is a multiple of 1/96 (weights 1, 1/2, 1/3 times 0.5**age), at least 1.6e-7 from a
# rounding boundary: float sums in any order (errors ~1e-12) round to the same value.


def transition_counts(train: pl.DataFrame, *, window: int = WINDOW) -> pl.DataFrame:
    """Pair weights ``(item, next_item, weight)`` from the train split (user_id, history, target): each user's
    longest example, which holds all of theirs (``--train-examples all-prefixes`` has one per prefix: each pair is
    still counted once)."""
    steps = (
        train.select("user_id", seq=pl.concat_list(pl.col("history"), pl.col("target")))
        .sort(pl.col("seq").list.len(), descending=True, maintain_order=True)
        .unique("user_id", keep="first", maintain_order=True)
        .select("seq")
        .with_row_index("row")
        .with_columns(pos=pl.int_ranges(0, pl.col("seq").list.len()))
        .explode("seq", "pos")
    )
    pairs = [
        steps.join(steps.with_columns(pos=pl.col("pos") - gap).rename({"seq": "next_item"}), on=["row", "pos"]).select(
            item="seq", next_item="next_item", weight=pl.lit(1.0 / gap)
        )
        for gap in range(1, window + 1)
    ]
    return (
        pl.concat(pairs)
        .group_by("item", "next_item")
        .agg(pl.col("weight").sum())
        .sort("item", "next_item")  # a stable order, whatever the join produced
    )


def recommend(
    counts: pl.DataFrame,
    histories: list[list[str]],
    *,
    depth: int,
    exclude_seen: bool,
    recent: int = RECENT,
    decay: float = DECAY,
    forget: pl.DataFrame | None = None,
) -> list[list[str]]:
    """Per history, the ``depth`` best next items, best first (ties: item id), possibly fewer, or none for a user
    whose recent items were never followed by anything. ``forget`` (user: the history's index, item, next_item,
    weight): pair weights taken out of ``counts`` for that user alone (:func:`own_pairs`: what a train example's
    own target and later items added), a pair left at no weight being no pair."""
    votes = (
        pl.DataFrame(
            {"user": range(len(histories)), "item": histories}, schema={"user": pl.Int64, "item": pl.List(pl.String)}
        )
        .with_columns(age=pl.int_ranges(pl.col("item").list.len(), 0, -1) - 1)
        .explode("item", "age")
        .drop_nulls("item")
    )
    pairs = votes.filter(pl.col("age") < recent).join(counts, on="item")
    if forget is not None:
        minus = forget.group_by("user", "item", "next_item").agg(minus=pl.col("weight").sum())
        pairs = (
            pairs.join(minus, on=["user", "item", "next_item"], how="left")
            .with_columns(weight=pl.col("weight") - pl.col("minus").fill_null(0.0))
            .filter(pl.col("weight") > 1e-9)  # 1, 1/2, 1/3 less the same: a float's error from 0
            .drop("minus")
        )
    scores = pairs.group_by("user", "next_item").agg(
        score=(pl.col("weight") * pl.lit(decay) ** pl.col("age")).sum().round(ROUND)
    )
    if exclude_seen:
        seen = votes.select("user", next_item="item")
        scores = scores.join(seen, on=["user", "next_item"], how="anti")
    top = (
        scores.sort(["user", "score", "next_item"], descending=[False, True, False])
        .group_by("user", maintain_order=True)
        .head(depth)
        .group_by("user", maintain_order=True)
        .agg("next_item")
    )
    lists = dict(zip(top.get_column("user").to_list(), top.get_column("next_item").to_list(), strict=True))
    return [lists.get(u, []) for u in range(len(histories))]


def own_pairs(train: pl.DataFrame, examples: pl.DataFrame, *, window: int = WINDOW) -> pl.DataFrame:
    """For each row of ``examples`` (train-split rows: user_id, history, target), the pairs that
    :func:`transition_counts` of ``train`` counted from that user's sequence at or after the row's target:
    (user: the row's index, item, next_item, weight). Taken out with ``recommend(forget=...)``, they leave the
    counts a model would have known just before that target (every other user's sequence, and this user's items
    before it), as the evaluation's counts stand to a held-out item."""
    longest = (
        train.select("user_id", seq=pl.concat_list(pl.col("history"), pl.col("target")))
        .sort(pl.col("seq").list.len(), descending=True, maintain_order=True)
        .unique("user_id", keep="first", maintain_order=True)
    )
    seq_of = dict(zip(longest.get_column("user_id").to_list(), longest.get_column("seq").to_list(), strict=True))
    rows: list[tuple[int, str, str, float]] = []
    for u, (user, history) in enumerate(zip(examples["user_id"].to_list(), examples["history"].to_list(), strict=True)):
        seq = seq_of.get(user, [])
        for j in range(len(history), len(seq)):
            rows += [(u, seq[j - gap], seq[j], 1.0 / gap) for gap in range(1, min(window, j) + 1)]
    return pl.DataFrame(
        rows, schema={"user": pl.Int64, "item": pl.String, "next_item": pl.String, "weight": pl.Float64}, orient="row"
    )
