"""One place for ranking a recipe's lists (``gloss_cli.recipe``): retrieval per query, the transitions list, seen-item
filtering, the merge (GLoSS's top-1 or reciprocal-rank fusion) and the reranked order. ``gloss eval``, ``gloss
rerank`` and ``gloss recommend`` all rank through here, so that they cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
import polars as pl

from gloss_cli.console import Reporter
from gloss_cli.fusion import RRF_C, fuse, reciprocal_rank
from gloss_cli.recipe import Recipe
from gloss_cli.retrieval import Retriever
from gloss_cli.transitions import DECAY, RECENT, WINDOW

# How equal scores are ordered, named in every description: a retriever's ties go by item id, a fusion's to the
# item found first (the earlier list or query)
TIE_ORDER = "equal scores: retrieval by item id, fusion by the list that found the item first"
CANDIDATES = "candidates.parquet"  # gloss rerank's scored pools, in its stage (rerank_stage)
MAX_SEEN_EXTRA = 100  # extra depth retrieved per query so that excluded history items can be replaced
TRANSITIONS_PARAMS = {"window": WINDOW, "recent": RECENT, "decay": DECAY}
TRANSITIONS_TEXT = (
    f"the items that followed the user's {RECENT} most recent items within {WINDOW} places in the known sequences, "
    f"weighted 1/gap, each older item's votes times {DECAY:g}"
)

Merged = list[tuple[int, float, int]]  # (item key, value, index of the list that found it first), best first


def query_depth(recipe: Recipe, k: int) -> int:
    """How many results each query keeps: top-1 under GLoSS's merge (LIS alone: its top-K), else K."""
    return 1 if recipe.merge == "top1" and recipe.lists != ("lis",) else k


def merge_user(
    keys: npt.NDArray[np.int64], scores: npt.NDArray[np.float32], seen: set[int], *, merge: str, depth: int
) -> Merged:
    """One user's merged list. keys/scores: (lists, retrieved), each list best first (a retriever's equal scores by
    key). Each list keeps its first ``depth`` items that are not padding or seen. ``top1``: an item keeps its
    highest retrieval score; ``rrf``: list i's item at rank r adds 1 / (i + 1) / (c + r). Equal values go to the item
    found first (GLoSS's own merge keeps that order: a stable sort of the items as found)."""
    kept: list[list[int]] = []
    best: dict[int, float] = {}
    for q in range(keys.shape[0]):
        row: list[int] = []
        for key, score in zip(keys[q].tolist(), scores[q].tolist(), strict=True):
            if len(row) == depth:
                break
            if key < 0 or key in seen:
                continue
            row.append(key)
            best[key] = max(best.get(key, score), score)
        kept.append(row)
    if merge == "rrf":
        return fuse(kept, c=RRF_C, weights=[1.0 / (q + 1) for q in range(len(kept))])
    found_at: dict[int, tuple[int, int]] = {}
    for q, row in enumerate(kept):
        for rank, key in enumerate(row):
            found_at.setdefault(key, (q, rank))
    order = sorted(best, key=lambda key: (-best[key], found_at[key]))
    return [(key, best[key], found_at[key][0]) for key in order]


def with_lead_list(
    keys: npt.NDArray[np.int64], scores: npt.NDArray[np.float32], lead: npt.NDArray[np.int64]
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]:
    """keys/scores (n, lists, m) with ``lead`` (n, m') or several lead lists (n, leads, m'), -1 padded, put first as
    if they were the first lists (cut or padded to m; their scores 0: fusion reads ranks only)."""
    lead = lead[:, None, :] if lead.ndim == 2 else lead
    first = np.full((keys.shape[0], lead.shape[1], keys.shape[2]), -1, dtype=keys.dtype)
    width = min(lead.shape[2], keys.shape[2])
    first[:, :, :width] = lead[:, :, :width]
    return (
        np.concatenate([first, keys], axis=1),
        np.concatenate([np.zeros(first.shape, dtype=scores.dtype), scores], axis=1),
    )


def padded_keys(lists: Sequence[Sequence[str]], key_of: dict[str, int], depth: int) -> npt.NDArray[np.int64]:
    """Item-id lists as an (n, depth) array of item keys, -1 padded (each list cut to ``depth``)."""
    out = np.full((len(lists), depth), -1, dtype=np.int64)
    for u, row in enumerate(lists):
        out[u, : min(len(row), depth)] = [key_of[i] for i in row[:depth]]
    return out


def transitions_lists(
    counts: pl.DataFrame,
    histories: Sequence[Sequence[str]],
    key_of: dict[str, int],
    *,
    depth: int,
    exclude_seen: bool,
    forget: pl.DataFrame | None = None,
) -> npt.NDArray[np.int64]:
    """Per user, the transitions list's first ``depth`` item keys, -1 padded (``counts``: transition_counts of the
    sequences the caller may know: the train split for evaluation, every sequence for a deployed recommender; less
    ``forget``, per user, for train-split examples: ``transitions.own_pairs``)."""
    from gloss_cli.transitions import recommend

    lists = recommend(counts, [list(h) for h in histories], depth=depth, exclude_seen=exclude_seen, forget=forget)
    return padded_keys(lists, key_of, depth)


def rank_users(
    recipe: Recipe,
    queries: Sequence[Sequence[str]],
    seen: Sequence[set[int]],
    *,
    k: int,
    retriever: Retriever | None,
    lead: npt.NDArray[np.int64] | None,
    reporter: Reporter | None = None,
) -> list[Merged]:
    """Each user's merged list, best first, at most ``k`` items (the recipe's ``order`` is applied by
    :func:`reranked`, to what ``gloss rerank`` scored).

    queries: per user the query texts in the recipe's order (the last item's title, then the model's), the same
    count for every user; seen: the history's item keys (used when the recipe excludes them); lead: the lists ranked
    without retrieval, when the recipe has them: (n, >= k) for one, (n, lists, >= k) in the recipe's order."""
    n = len(seen)
    excluded = list(seen) if recipe.exclude_seen else [set() for _ in range(n)]
    depth = query_depth(recipe, k)
    per_user = len(queries[0]) if n and queries else 0
    if per_user:
        assert retriever is not None, "a recipe with queries needs a retriever"
        extra = min(max((len(s) for s in excluded), default=0), MAX_SEEN_EXTRA)
        flat = [text for user in queries for text in user]
        if reporter is not None:
            with reporter.progress(f"retrieve ({retriever.name})", len(flat)) as tick:
                keys, scores = retriever.search(flat, depth + extra, tick=tick)
        else:
            keys, scores = retriever.search(flat, depth + extra)
        shape = (n, per_user, keys.shape[1])
        keys, scores = keys.reshape(shape), scores.reshape(shape)
    else:
        keys = np.full((n, 0, k), -1, dtype=np.int64)
        scores = np.zeros((n, 0, k), dtype=np.float32)
    if lead is not None:
        if keys.shape[2] < k:  # pad every list to k columns, so that the lead list keeps its first k items
            pad = ((0, 0), (0, 0), (0, k - keys.shape[2]))
            keys = np.pad(keys, pad, constant_values=-1)
            scores = np.pad(scores, pad, constant_values=0.0)
        keys, scores = with_lead_list(keys, scores, lead)
    return [merge_user(keys[u], scores[u], excluded[u], merge=recipe.merge, depth=depth)[:k] for u in range(n)]


def as_array(merged: Sequence[Merged], k: int) -> npt.NDArray[np.int64]:
    """The merged lists' item keys as (n, k), -1 padded."""
    ranked = np.full((len(merged), k), -1, dtype=np.int64)
    for u, row in enumerate(merged):
        ranked[u, : len(row)] = [key for key, _, _ in row[:k]]
    return ranked


def reranked(
    frame: pl.DataFrame, users: Sequence[str], key_of: dict[str, int], *, order: str, k: int
) -> npt.NDArray[np.int64]:
    """Per user (in ``users`` order), the top-``k`` item keys of its scored pool (``gloss rerank``'s
    candidates.parquet), -1 padded: ``lm`` by log-probability per title token, ``fused`` by reciprocal-rank fusion of
    the pool's order and the model's (equal weights). Equal values, in the model's order as in the final one, go to
    the better pool rank (unique per user), so the order never depends on the frame's row order."""
    fused = reciprocal_rank(pl.col("pool_rank"), c=RRF_C) + reciprocal_rank(pl.col("lm_rank"), c=RRF_C)
    top = (
        frame.with_columns(per_token=pl.col("logprob") / pl.col("tokens"))
        .sort(["user_id", "per_token", "pool_rank"], descending=[False, True, False])
        .with_columns(lm_rank=pl.int_range(1, pl.len() + 1).over("user_id"))
        .with_columns(value=pl.col("per_token") if order == "lm" else fused)
        .sort(["user_id", "value", "pool_rank"], descending=[False, True, False])
        .group_by("user_id", maintain_order=True)
        .head(k)
        .group_by("user_id", maintain_order=True)
        .agg(pl.col("item_id"))
    )
    lists = dict(zip(top.get_column("user_id").to_list(), top.get_column("item_id").to_list(), strict=True))
    ranked = np.full((len(users), k), -1, dtype=np.int64)
    for u, user in enumerate(users):
        row = [key_of[i] for i in lists.get(user, [])]
        ranked[u, : len(row)] = row
    return ranked


def rerank_stage(split: str, recipe: Recipe, retriever: str) -> str:
    """The stage holding the pools ``gloss rerank`` scored for ``recipe`` (its list in retrieval order, the top
    ``candidates``) as ``retriever`` retrieved them (its index key, path-safe: ``org/model`` -> ``org_model``)."""
    from gloss_cli.retrieval import index_key

    return f"rerank/{split}-{recipe.pool().name()}-{recipe.candidates}-{index_key(retriever)}"
