"""Ranking metrics for one relevant item per user (leave-one-out), as pure numpy functions.

A user's result is the 0-based rank of the target in the recommended list, or -1 when the target is absent.
With one relevant item: Recall@K = hit@K, NDCG@K = 1 / log2(rank + 2) for a hit, MRR@K = 1 / (rank + 1) for a hit.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float64]


def target_ranks(ranked: npt.ArrayLike, targets: npt.ArrayLike) -> IntArray:
    """0-based position of each row's target in ``ranked`` (shape (n, L), -1 = padding), or -1 if absent."""
    ranked = np.asarray(ranked)
    targets = np.asarray(targets)
    if ranked.ndim != 2 or targets.shape != (ranked.shape[0],):
        raise ValueError(f"ranked must be (n, L) and targets (n,), got {ranked.shape} and {targets.shape}")
    hits = (ranked == targets[:, None]) & (ranked >= 0)
    found = hits.any(axis=1)
    return np.where(found, hits.argmax(axis=1), -1).astype(np.int64)


def _hit(ranks: npt.ArrayLike, k: int) -> npt.NDArray[np.bool_]:
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    r = np.asarray(ranks)
    return (r >= 0) & (r < k)


def recall_at_k(ranks: npt.ArrayLike, k: int) -> FloatArray:
    return _hit(ranks, k).astype(np.float64)


def ndcg_at_k(ranks: npt.ArrayLike, k: int) -> FloatArray:
    r = np.asarray(ranks)
    return np.where(_hit(r, k), 1.0 / np.log2(np.maximum(r, 0) + 2.0), 0.0)


def mrr_at_k(ranks: npt.ArrayLike, k: int) -> FloatArray:
    r = np.asarray(ranks)
    return np.where(_hit(r, k), 1.0 / (np.maximum(r, 0) + 1.0), 0.0)


METRICS = {"recall": recall_at_k, "ndcg": ndcg_at_k, "mrr": mrr_at_k}


def per_user(ranks: npt.ArrayLike, ks: list[int]) -> dict[str, FloatArray]:
    """{"recall@5": per-user values, "ndcg@5": ..., "mrr@5": ...} for every k."""
    return {f"{name}@{k}": fn(ranks, k) for k in ks for name, fn in METRICS.items()}


def bootstrap_ci(
    values: npt.ArrayLike, *, n_boot: int = 1000, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of the mean over users."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    chunk = max(1, 2_000_000 // v.size)  # bounded memory for large user sets
    means = np.concatenate(
        [
            v[rng.integers(0, v.size, size=(min(chunk, n_boot - i), v.size))].mean(axis=1)
            for i in range(0, n_boot, chunk)
        ]
    )
    lo, hi = np.quantile(means, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)


def paired_difference(
    a: npt.ArrayLike, b: npt.ArrayLike, *, n_boot: int = 1000, seed: int = 0, level: float = 0.95
) -> dict[str, float]:
    """A - B over the same users (per-user values in the same order): the mean difference, its paired bootstrap
    CI (resampling users, so each resample keeps a user's two values together), and the difference relative to
    B's mean."""
    va, vb = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if va.shape != vb.shape:
        raise ValueError(f"paired values need the same users, got {va.shape} and {vb.shape}")
    diff = va - vb
    lo, hi = bootstrap_ci(diff, n_boot=n_boot, seed=seed, level=level)
    base = float(vb.mean()) if vb.size else float("nan")
    mean = float(diff.mean()) if diff.size else float("nan")
    return {
        "a": float(va.mean()),
        "b": base,
        "diff": mean,
        "lo": lo,
        "hi": hi,
        "relative": mean / base if base else float("nan"),
    }
