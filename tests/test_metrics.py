from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from gloss_cli.metrics import bootstrap_ci, mrr_at_k, ndcg_at_k, per_user, recall_at_k, target_ranks

ranks = st.lists(st.integers(min_value=-1, max_value=30), min_size=1, max_size=50)


@given(ranks, st.integers(min_value=1, max_value=20))
def test_values_are_in_unit_interval(r: list[int], k: int) -> None:
    for fn in (recall_at_k, ndcg_at_k, mrr_at_k):
        v = fn(r, k)
        assert ((v >= 0) & (v <= 1)).all()


@given(ranks, st.integers(min_value=1, max_value=20))
def test_recall_is_non_decreasing_in_k(r: list[int], k: int) -> None:
    assert (recall_at_k(r, k + 1) >= recall_at_k(r, k)).all()
    assert (ndcg_at_k(r, k + 1) >= ndcg_at_k(r, k)).all()


@given(st.integers(min_value=1, max_value=20))
def test_rank_one_hit_gives_ndcg_and_mrr_one(k: int) -> None:
    assert recall_at_k([0], k)[0] == ndcg_at_k([0], k)[0] == mrr_at_k([0], k)[0] == 1.0


@given(ranks, st.integers(min_value=1, max_value=20))
def test_ndcg_between_mrr_and_recall(r: list[int], k: int) -> None:
    assert (mrr_at_k(r, k) <= ndcg_at_k(r, k) + 1e-12).all()
    assert (ndcg_at_k(r, k) <= recall_at_k(r, k)).all()


def test_known_values() -> None:
    assert ndcg_at_k([2], 5)[0] == pytest.approx(0.5)  # 1/log2(4)
    assert mrr_at_k([3], 5)[0] == pytest.approx(0.25)
    assert recall_at_k([5], 5)[0] == 0.0  # rank 6 is outside the top 5
    assert list(target_ranks([[4, 7, -1], [1, 2, 3], [-1, -1, -1]], [7, 9, -1])) == [1, -1, -1]


def test_bootstrap_ci_brackets_the_mean() -> None:
    values = np.random.default_rng(1).random(2000) < 0.05
    lo, hi = bootstrap_ci(values)
    assert lo < values.mean() < hi and hi - lo < 0.03
    assert bootstrap_ci(values) == (lo, hi)  # seeded


@pytest.mark.slow  # numba compilation inside ranx
def test_metrics_equal_ranx() -> None:
    ranx = pytest.importorskip("ranx")
    rng = np.random.default_rng(0)
    n, L = 300, 5
    ranked = np.stack([rng.choice(40, size=L, replace=False) for _ in range(n)])
    lengths = rng.integers(1, L + 1, size=n)  # short lists, as the paper protocol gives (padding at the end)
    ranked[np.arange(L)[None, :] >= lengths[:, None]] = -1
    targets = rng.integers(0, 40, size=n)
    ranks = target_ranks(ranked, targets)
    ours = {m: float(v.mean()) for m, v in per_user(ranks, [5]).items()}
    qrels = ranx.Qrels({f"u{u}": {f"i{targets[u]}": 1} for u in range(n)})
    run = ranx.Run(
        {
            f"u{u}": {f"i{k}": float(L - j) for j, k in enumerate(row) if k >= 0} or {"none": 0.0}
            for u, row in enumerate(ranked)
        }
    )
    theirs = ranx.evaluate(qrels, run, ["recall@5", "ndcg@5", "mrr@5"])
    for metric in ours:
        assert ours[metric] == pytest.approx(theirs[metric], abs=1e-9), metric
