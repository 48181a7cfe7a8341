"""Equal scores are ordered by gloss's rules, never by a library's selection algorithm (issue 18).

Retrievers: score descending, then item key (catalog row) ascending, also for which tied items make a top k.
Fusions and merges: value descending, then the item found first (earlier list, then better rank).
Transitions: score (rounded) descending, then item id. Every case below builds exact ties.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from gloss_cli.backends.dense import DenseIndex, build_dense_index
from gloss_cli.console import Tick
from gloss_cli.ranking import as_array, merge_user, reranked, with_lead_list
from gloss_cli.retrieval import BM25Retriever, DenseRetriever, HybridRetriever, top_k
from gloss_cli.transitions import recommend


def _reference(scores: np.ndarray, k: int) -> list[list[int]]:
    return [sorted(range(len(row)), key=lambda key: (-row[key], key))[:k] for row in scores.tolist()]


# -- the shared top-k -----------------------------------------------------------------------------------------
def test_top_k_takes_the_lowest_keys_among_items_tied_at_the_kth_score() -> None:
    scores = np.array([[1, 3, 3, 2, 3, 0], [0, 0, 0, 0, 0, 0], [5, 4, 3, 2, 1, 0]], dtype=np.float32)
    keys, values = top_k(scores, 2)
    assert keys.tolist() == [[1, 2], [0, 1], [0, 1]] and keys.dtype == np.int64 and values.dtype == np.float32
    assert values.tolist() == [[3, 3], [0, 0], [5, 4]]
    assert top_k(scores, 4)[0].tolist() == [[1, 2, 4, 3], [0, 1, 2, 3], [0, 1, 2, 3]]
    assert top_k(scores, 10)[0].tolist() == [[1, 2, 4, 3, 0, 5], [0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 4, 5]]


@pytest.mark.parametrize("seed", range(5))
def test_top_k_equals_a_full_sort_by_score_then_key(seed: int) -> None:
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, 4, size=(40, 300)).astype(np.float32) / 3  # few values: ties everywhere
    for k in (1, 5, 37, 299, 300, 400):
        keys, values = top_k(scores, k)
        assert keys.tolist() == _reference(scores, k)
        np.testing.assert_array_equal(values, np.take_along_axis(scores, keys, axis=1))


# -- BM25 -----------------------------------------------------------------------------------------------------
TITLES = [
    "Title: blue pen",
    "Title: red pen",
    "Title: red lipstick matte",  # 2, 5, 7: one title three times, as the Amazon catalogs repeat titles
    "Title: garden hose",
    "Title: lipstick case",
    "Title: red lipstick matte",
    "Title: green tea",
    "Title: red lipstick matte",
    "Title: matte paint",
    "Title: pen case",
]


@pytest.fixture
def bm25(tmp_path: Path) -> BM25Retriever:
    return BM25Retriever.build(TITLES, tmp_path / "bm25")


def test_bm25_orders_duplicate_titles_by_key(bm25: BM25Retriever) -> None:
    keys, scores = bm25.search(["red lipstick matte", "lipstick"], 4)
    assert keys[0, :3].tolist() == [2, 5, 7] and scores[0, 0] == scores[0, 1] == scores[0, 2] > scores[0, 3]
    # "lipstick": items 2, 5, 7 score the same, item 4 (a shorter title) more
    assert keys[1].tolist() == [4, 2, 5, 7] and scores[1, 1] == scores[1, 3] < scores[1, 0]
    assert bm25.search(["red lipstick matte"], 2)[0].tolist() == [[2, 5]]  # the lowest keys make the cut
    assert bm25.search(["lipstick"], 3)[0].tolist() == [[4, 2, 5]]


def test_bm25_scores_are_bm25s_own_and_zero_scores_fill_by_key(bm25: BM25Retriever) -> None:
    import bm25s

    queries = ["red lipstick matte", "pen case", "nothing matches", ""]
    keys, scores = bm25.search(queries, 10)
    tokens = bm25s.tokenize(queries, stopwords="en", return_ids=False, show_progress=False)
    for row, query in enumerate(tokens):
        want = bm25.model.get_scores(query) if query else np.zeros(len(TITLES), np.float32)
        np.testing.assert_array_equal(scores[row], want[keys[row]])  # bit for bit
        assert keys[row].tolist() == _reference(want[None, :], 10)[0]
    assert keys[2].tolist() == list(range(10)) and not scores[2].any()  # no token in common: catalog order
    assert keys.shape == (4, 10) and bm25.search(queries, 50)[0].shape == (4, 10)  # k cut to the catalog


# -- dense ----------------------------------------------------------------------------------------------------
def _vectors() -> np.ndarray:
    """Unit rows whose dot products with the axes are exact: key % 4's axis, but 2, 5, 7 (and 6) on axis 2 and 1, 8
    (and 9) on axis 1."""
    rows = np.zeros((10, 4), dtype=np.float32)
    for key in range(10):
        rows[key, key % 4] = 1.0
    rows[[2, 5, 7]] = [0.0, 0.0, 1.0, 0.0]
    rows[[1, 8]] = [0.0, 1.0, 0.0, 0.0]
    return rows


@pytest.mark.parametrize("ann", [False, True])
def test_dense_index_orders_equal_vectors_by_key(tmp_path: Path, ann: bool) -> None:
    vectors = _vectors()
    build_dense_index(vectors, tmp_path / "idx", ann=ann)
    index = DenseIndex.load(tmp_path / "idx")
    assert (index.hnsw is not None) == ann
    axes = np.eye(4, dtype=np.float32)
    keys, scores = index.search(axes, 10)  # the whole catalog: the ANN search finds every row of so few
    assert keys.tolist() == _reference(axes @ vectors.T, 10)
    assert keys[2, :5].tolist() == [2, 5, 6, 7, 0] and keys[1, :4].tolist() == [1, 8, 9, 0]  # then 0-scores by key
    np.testing.assert_array_equal(scores[2], [1, 1, 1, 1, 0, 0, 0, 0, 0, 0])
    if not ann:  # the exact search also decides which tied rows make the cut
        assert index.search(axes[2], 2)[0].tolist() == [[2, 5]]


def test_dense_exact_search_keeps_the_lowest_keys_of_many_equal_vectors(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    vectors = rng.standard_normal((2000, 8)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    same = rng.choice(2000, size=300, replace=False)  # 300 copies of one vector, scattered over the catalog
    vectors[same] = vectors[same[0]]
    build_dense_index(vectors, tmp_path / "idx")
    keys, scores = DenseIndex.load(tmp_path / "idx").search(vectors[same[:1]], 50)
    assert keys[0].tolist() == sorted(same.tolist())[:50] and (scores == scores[0, 0]).all()


class AxisEncoder:
    """A fake encoder: the text "axis N" is the unit vector of axis N."""

    name = resolved = "axes"

    def encode(self, texts: Sequence[str], *, kind: str, tick: Tick | None = None) -> np.ndarray:
        return np.eye(4, dtype=np.float32)[[int(text.split()[-1]) for text in texts]]


def test_dense_retriever_orders_equal_vectors_by_key(tmp_path: Path) -> None:
    build_dense_index(_vectors(), tmp_path / "idx")
    retriever = DenseRetriever(AxisEncoder(), DenseIndex.load(tmp_path / "idx"), "axes", "axes")
    keys, _ = retriever.search(["axis 2", "axis 1", "axis 2"], 3)
    assert keys.tolist() == [[2, 5, 6], [1, 8, 9], [2, 5, 6]]


# -- hybrid ---------------------------------------------------------------------------------------------------
class Fixed:
    """A retriever that returns fixed lists (one per query)."""

    name = description = "fixed"

    def __init__(self, rows: list[list[int]]) -> None:
        self.rows = rows

    def search(self, texts: Sequence[str], k: int, *, tick: Tick | None = None) -> tuple[np.ndarray, np.ndarray]:
        keys = np.array([row[:k] for row in self.rows], dtype=np.int64)
        return keys, np.zeros(keys.shape, dtype=np.float32)


def test_hybrid_ties_go_to_the_item_found_first_not_the_lowest_key() -> None:
    # 9 and 3 both score 1/61 + 1/62, as do 4 and 8 (1/63 each): the first part's order decides
    hybrid = HybridRetriever((Fixed([[9, 3, 8]]), Fixed([[3, 9, 4]])), "a+b", "a+b", c=60)
    keys, scores = hybrid.search(["q"], 4)
    assert keys.tolist() == [[9, 3, 8, 4]]
    assert scores[0, 0] == scores[0, 1] and scores[0, 2] == scores[0, 3]


def test_hybrid_of_bm25_keeps_its_key_order(bm25: BM25Retriever) -> None:
    hybrid = HybridRetriever((bm25, bm25), "bm25+bm25", "bm25 twice")
    assert hybrid.search(["red lipstick matte"], 3)[0].tolist() == [[2, 5, 7]]


# -- the recipes' merges --------------------------------------------------------------------------------------
def test_paper_merge_ties_go_to_the_earlier_query() -> None:
    keys = np.array([[8], [3], [8], [1]])
    scores = np.array([[2.0], [2.0], [1.0], [2.5]], dtype=np.float32)
    merged = merge_user(keys, scores, set(), merge="top1", depth=1)
    # 8 found by query 0 (its best score kept), 3 by query 1: equal scores, 8 first although 3 < 8
    assert merged == [(1, 2.5, 3), (8, 2.0, 0), (3, 2.0, 1)]


def test_fused_merge_ties_go_to_the_earlier_query_then_the_better_rank() -> None:
    # weights 1/(q+1) / (1 + rank): q0's third item and q1's first are both worth 1/4; q1's second and q2's first 1/6
    keys = np.array([[10, 11, 4], [2, 12, -1], [1, -1, -1]])
    merged = merge_user(keys, np.zeros(keys.shape, np.float32), set(), merge="rrf", depth=3)
    assert [key for key, _, _ in merged] == [10, 11, 4, 2, 12, 1]
    assert merged[2][1] == merged[3][1] == 0.25 and merged[4][1] == merged[5][1]
    # a history item leaves the list and the ranks close up: q0's 4 moves to rank 2 (1/3), 11 is gone
    merged = merge_user(keys, np.zeros(keys.shape, np.float32), {11}, merge="rrf", depth=3)
    assert [key for key, _, _ in merged] == [10, 4, 2, 12, 1]


def test_a_lead_list_wins_its_ties_with_the_queries() -> None:
    lead = np.array([[5, 9, 6]])  # the transitions list, fused first
    keys, scores = with_lead_list(np.array([[[2, 7, -1]]]), np.ones((1, 1, 3), np.float32), lead)
    ranked = as_array([merge_user(keys[0], scores[0], set(), merge="rrf", depth=3)[:5]], 5)
    assert ranked.tolist() == [[5, 9, 6, 2, 7]]  # 6 (lead, rank 3) and 2 (query 1, rank 1) tie at 1/4


def _pool(order: list[int], logprob: list[float]) -> pl.DataFrame:
    """One user's pool, its rows in ``order`` (pool ranks), logprob[i] for pool rank i + 1 (one token each)."""
    return pl.DataFrame(
        {
            "user_id": ["U"] * len(order),
            "item_id": [f"P{r}" for r in order],
            "pool_rank": order,
            "logprob": [logprob[r - 1] for r in order],
            "tokens": [1] * len(order),
        },
        schema_overrides={"pool_rank": pl.Int32, "logprob": pl.Float32, "tokens": pl.Int32},
    )


def test_reranked_ties_go_to_the_better_pool_rank_whatever_the_row_order() -> None:
    logprob = [-1.0, -1.0, -2.0, -1.0, -2.0]
    key_of = {f"P{r}": r for r in range(1, 6)}
    for order in ([1, 2, 3, 4, 5], [5, 2, 3, 1, 4], [4, 3, 5, 1, 2]):
        frame = _pool(order, logprob)
        # lm: -1 (pool 1, 2, 4), then -2 (pool 3, 5)
        assert reranked(frame, ["U"], key_of, order="lm", k=5).tolist() == [[1, 2, 4, 3, 5]]
        # fused: lm ranks 1, 2, 4, 3, 5 -> P3 = 1/4 + 1/5 = P4 = 1/5 + 1/4: the better pool rank first
        assert reranked(frame, ["U"], key_of, order="fused", k=5).tolist() == [[1, 2, 3, 4, 5]]


# -- transitions ----------------------------------------------------------------------------------------------
def test_transitions_ties_go_to_the_lower_item_id_whatever_the_sums_order() -> None:
    rows = [("b", "q", 0.1), ("a", "q", 0.4), ("b", "p", 0.3), ("b", "z", 0.2), ("b", "c", 0.2), ("a", "d", 0.2)]
    for shuffled in range(3):
        random.Random(shuffled).shuffle(rows)
        counts = pl.DataFrame(rows, schema=["item", "next_item", "weight"], orient="row")
        # b is the last item (weight 1), a the one before (0.5): q = 0.1 + 0.5 * 0.4 = 0.30000000000000004 and
        # p = 0.3 tie once rounded (p first by id); c, z = 0.2 and d = 0.5 * 0.2 = 0.1
        assert recommend(counts, [["a", "b"]], depth=5, exclude_seen=True) == [["p", "q", "c", "z", "d"]]
