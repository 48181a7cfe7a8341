"""Reciprocal-rank fusion, written once: an item at rank r (from 1) of a list with weight w adds w / (c + r).

Three places fuse ranked lists with it: a recipe's lists (``gloss_cli.ranking``, c = :data:`RRF_C`, list i weighs
1 / (i + 1)), a reranked pool's two orders (c = :data:`RRF_C`, equal weights) and a hybrid retriever's two
retrievers (``gloss_cli.retrieval.HybridRetriever``, c = :data:`HYBRID_RRF_C`, equal weights).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeVar

T = TypeVar("T")

# A recipe's c (and the rerank fusion's): small, so that each list's top items dominate its tail
RRF_C = 1.0
# A hybrid retriever's c: the usual constant of reciprocal-rank fusion (Cormack et al., 2009)
HYBRID_RRF_C = 60.0


def reciprocal_rank(rank: T, *, c: float, weight: float = 1.0) -> T:
    """``weight / (c + rank)``, rank from 1: for a number, a numpy array or a polars expression alike."""
    value: Any = weight / (c + rank)  # type: ignore[operator]
    return value


def fuse(
    lists: Sequence[Sequence[int]], *, c: float, weights: Sequence[float] | None = None
) -> list[tuple[int, float, int]]:
    """(key, fused score, index of the list that found it first), best first. Equal scores go to the item found
    first: by the earlier list, then at the better rank in it; no two items are found at the same place, so the
    order is total. Keys below 0 are padding."""
    score: dict[int, float] = {}
    found_at: dict[int, tuple[int, int]] = {}
    for i, ranked in enumerate(lists):
        weight = 1.0 if weights is None else weights[i]
        for rank, key in enumerate(ranked, start=1):
            if key < 0:
                continue
            score[key] = score.get(key, 0.0) + reciprocal_rank(rank, c=c, weight=weight)
            found_at.setdefault(key, (i, rank))
    order = sorted(score, key=lambda key: (-score[key], found_at[key]))
    return [(key, score[key], found_at[key][0]) for key in order]
