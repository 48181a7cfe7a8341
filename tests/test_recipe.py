"""Recipes (gloss_cli.recipe): presets and the explicit form read back to the same recipe, names are path-safe and
stable, every command shares one default; and the one reciprocal-rank fusion (gloss_cli.fusion) they rank with."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import polars as pl
import pytest
from typer.testing import CliRunner

from gloss_cli.cli import app
from gloss_cli.errors import GlossError
from gloss_cli.fusion import HYBRID_RRF_C, RRF_C, fuse, reciprocal_rank
from gloss_cli.recipe import DEFAULT, DEFAULT_RERANK, PRESETS, Recipe, from_dict, parse

runner = CliRunner()

# (explicit form, the name it gets): a preset modified, or key=value words over the default
EXPLICIT = [
    ("lists=lis,model queries=2", "lis+model2-rrf-xseen"),
    ("paper seen=excluded", "model5-top1-xseen"),
    ("model seen=kept", "model5-rrf-kept"),
    ("lis users=all", "lis-rrf-xseen-allusers"),
    ("lis-paper users=all", "lis-top1-kept-allusers"),
    ("transitions seen=kept users=all", "transitions-rrf-kept-allusers"),
    ("no-model users=all", "transitions+lis-rrf-xseen-allusers"),
    ("gloss queries=5", "transitions+lis+model5-rrf-xseen"),
    ("lis lists=lis,model", "lis+model5-rrf-xseen"),  # model added to a recipe without it: the paper's 5 queries
    ("rerank candidates=50", "transitions+lis+model2-rrf-xseen-fused50"),
    ("lists=lis order=lm candidates=3 users=all", "lis-rrf-xseen-lm3-allusers"),
    # written out in full, a preset is that preset
    ("lists=transitions,lis,model queries=2 merge=rrf seen=excluded order=retrieval users=generated", "gloss"),
    ("paper lists=lis", "lis-paper"),  # queries drop to 0 with the model
    ("lists=lis,model queries=2 order=fused", "lis+model2-rrf-xseen-fused20"),
]


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_reads_back_from_its_name_its_explicit_form_and_its_record(name: str) -> None:
    recipe = PRESETS[name]
    assert parse(name) == recipe and recipe.name() == name
    assert parse(recipe.explicit()) == recipe
    assert from_dict(recipe.as_dict()) == recipe
    assert from_dict(json.loads(json.dumps(recipe.as_dict()))) == recipe  # as a manifest stores it
    assert recipe.as_dict()["name"] == name and recipe.as_dict()["lists"] == list(recipe.lists)
    assert parse(recipe.pool().explicit()) == recipe.pool() and not recipe.pool().reranked


@pytest.mark.parametrize(("text", "name"), EXPLICIT, ids=[text for text, _ in EXPLICIT])
def test_explicit_forms_read_back_and_name_themselves(text: str, name: str) -> None:
    recipe = parse(text)
    assert recipe.name() == name
    assert parse(recipe.explicit()) == recipe and from_dict(recipe.as_dict()) == recipe
    assert parse(f"  {text}  ") == recipe  # words, however spaced
    assert all(c.isalnum() or c in "+-" for c in name)  # run and stage names derive from it


def test_explicit_forms_modify_their_preset_only_where_they_say() -> None:
    assert parse("paper seen=excluded") == Recipe(lists=("model",), queries=5, merge="top1", seen="excluded")
    assert parse("seen=kept") == Recipe(seen="kept")  # no preset: over the default (gloss)
    assert parse("lists=lis") == PRESETS["lis"]  # queries drop to 0 without the model
    assert parse("lists=lis,model") == Recipe(lists=("lis", "model"), queries=2)  # the default's 2 queries
    assert parse("rerank").pool() == PRESETS["gloss"] and parse("rerank-lm").pool() == PRESETS["gloss"]
    assert PRESETS["paper"].describe().startswith("recipe paper: the first 5 generated queries: top-1 per query")
    assert "history items kept" in PRESETS["lis-paper"].describe()
    assert "top-K of the last item's title" in PRESETS["lis-paper"].describe()
    assert "its top 20 reordered by the model's log-probability" in PRESETS["rerank-lm"].describe()
    assert "every user of the split" in parse("lis users=all").describe()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "The recipe is empty"),
        ("magic", "Unknown recipe 'magic'"),
        ("gloss beams=3", "Recipe: cannot read 'beams=3'"),
        ("lists=", "Recipe: cannot read 'lists='"),
        ("seen=kept seen=kept", "Recipe: seen is given twice"),
        ("merge=magic", "Recipe: merge=magic is unknown"),
        ("lists=lis,lis", "is not a list of distinct"),
        ("lists=model,lis", "lists are fused in the order sasrec, transitions, lis, model"),
        ("no-model merge=top1", "the transitions list is ranked, not a query"),
        ("paper order=lm", "order=lm reorders a pool filled to its depth"),
        ("model users=all", "users=all with the model's queries"),
        ("lis queries=2", "queries=2 but lists has no model"),
        ("model queries=0", "lists has model but queries is below 1"),
        ("model queries=two", "queries=two is not a whole number"),
        ("rerank candidates=0", "candidates=0 is below 1"),
    ],
)
def test_an_impossible_recipe_is_one_error(text: str, message: str) -> None:
    with pytest.raises(GlossError) as caught:
        parse(text)
    assert message in caught.value.message and caught.value.hint


def test_a_record_with_unknown_keys_or_wrong_types_is_refused() -> None:
    with pytest.raises(GlossError, match="unknown keys beams"):
        from_dict({"name": "gloss", "beams": 3})
    with pytest.raises(GlossError, match="Recipe"):
        from_dict({"lists": ["lis"], "queries": "two"})
    assert from_dict({"name": "paper"}) == PRESETS["paper"]  # a preset's name alone


def test_gloss_recipes_lists_every_preset() -> None:
    result = runner.invoke(app, ["recipes", "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert list(doc) == list(PRESETS)
    for name, record in doc.items():
        assert record["description"] == PRESETS[name].describe()
        assert from_dict({k: v for k, v in record.items() if k != "description"}) == PRESETS[name]
    table = runner.invoke(app, ["recipes"])
    assert table.exit_code == 0 and all(f"│ {name} " in table.stdout for name in PRESETS)


# -- one default for every command ------------------------------------------------------------------------------
class _Stop(GlossError):
    def __init__(self) -> None:
        super().__init__("stopped by the test", "none")


def _recipe_given(monkeypatch: pytest.MonkeyPatch, target: str, args: list[str]) -> tuple[Recipe, dict[str, Any]]:
    """The recipe (and the other arguments) that the command passes to ``target``, which the test stops there."""
    seen: dict[str, Any] = {}

    def stop(*positional: Any, **keywords: Any) -> Any:
        seen.update(keywords, positional=positional)
        raise _Stop

    monkeypatch.setattr(target, stop)
    result = runner.invoke(app, [*args, "-p", "p"])
    assert result.exit_code == 1 and "stopped by the test" in result.stderr, result.output
    recipe = seen.get("recipe") or next(a for a in seen["positional"] if isinstance(a, Recipe))
    return recipe, seen


def test_eval_recommend_rerank_and_run_share_one_default(monkeypatch: pytest.MonkeyPatch) -> None:
    from gloss_cli.pipeline import RunPlan
    from gloss_cli.rerank import run as rerank_run

    assert DEFAULT == "gloss" and DEFAULT_RERANK == "rerank"
    evaluated, seen = _recipe_given(monkeypatch, "gloss_cli.evaluate.run", ["eval"])
    assert evaluated == PRESETS["gloss"] and seen["split"] == "test"
    recommended, _ = _recipe_given(monkeypatch, "gloss_cli.recommend.Recommender", ["recommend", "--user", "U"])
    assert recommended == PRESETS["gloss"]
    reranked, seen = _recipe_given(monkeypatch, "gloss_cli.rerank.run", ["rerank"])
    assert reranked == PRESETS["rerank"] and reranked.pool() == PRESETS["gloss"]
    assert seen["positional"][1] == "test"  # the split: as eval's
    assert rerank_run.__kwdefaults__["recipe"] is None  # the library's default: the command's
    assert parse(RunPlan.make(full=False).recipe) == parse(RunPlan.make(full=True).recipe) == PRESETS["gloss"]
    # and a --recipe reaches each of them as written
    given, _ = _recipe_given(monkeypatch, "gloss_cli.evaluate.run", ["eval", "--recipe", "paper"])
    assert given == PRESETS["paper"]
    given, _ = _recipe_given(monkeypatch, "gloss_cli.rerank.run", ["rerank", "-R", "rerank-lm candidates=5"])
    assert given == parse("rerank-lm candidates=5")


# -- the fusion every recipe ranks with --------------------------------------------------------------------------
def test_fuse_orders_ties_by_the_list_that_found_the_item_first_then_its_rank() -> None:
    # c = 1, equal weights: rank r adds 1 / (1 + r)
    fused = fuse([[5, 6], [6, 5], [7], [8, -1, 9]], c=1.0)
    # 5 and 6 tie (1/2 + 1/3): both first found by list 0, 5 at the better rank; 7 and 8 tie (1/2): list 2 found 7;
    # -1 is padding, which keeps its place (9 at rank 3)
    assert [(key, list_) for key, _, list_ in fused] == [(5, 0), (6, 0), (7, 2), (8, 3), (9, 3)]
    assert [value for _, value, _ in fused] == pytest.approx([1 / 2 + 1 / 3] * 2 + [1 / 2] * 2 + [1 / 4])
    # whatever the keys' order: 30 found first (list 0) goes before 10 (list 1) at an equal score
    assert [key for key, _, _ in fuse([[30], [10]], c=1.0)] == [30, 10]
    # weights: list i of a recipe weighs 1 / (i + 1)
    weighted = fuse([[1, 2], [2, 1]], c=RRF_C, weights=[1.0, 0.5])
    assert [key for key, _, _ in weighted] == [1, 2]
    assert weighted[0][1] == pytest.approx(1 / 2 + 0.5 / 3) and weighted[1][1] == pytest.approx(1 / 3 + 0.5 / 2)
    assert fuse([], c=1.0) == [] and fuse([[-1, -1]], c=1.0) == []


def test_reciprocal_rank_is_one_formula_for_numbers_arrays_and_polars() -> None:
    assert reciprocal_rank(1, c=1.0) == 0.5 and reciprocal_rank(3, c=1.0, weight=0.5) == 0.125
    assert reciprocal_rank(np.array([1, 2]), c=60.0).tolist() == pytest.approx([1 / 61, 1 / 62])
    frame = pl.DataFrame({"rank": [1, 2, 3]})
    values = frame.select(value=reciprocal_rank(pl.col("rank"), c=RRF_C))["value"].to_list()
    assert values == pytest.approx([1 / 2, 1 / 3, 1 / 4])


def test_the_hybrid_retriever_fuses_its_parts_with_the_same_fusion() -> None:
    from gloss_cli.retrieval import HybridRetriever

    class Fixed:
        description = name = "fixed"

        def __init__(self, rows: list[list[int]]) -> None:
            self.rows = rows

        def search(self, texts: list[str], k: int, *, tick: object = None) -> tuple[np.ndarray, np.ndarray]:
            keys = np.array([row[:k] for row in self.rows], dtype=np.int64)
            return keys, np.zeros(keys.shape, dtype=np.float32)

    a, b = [[4, 2, 9, 1], [3, -1, -1, -1]], [[2, 4, 1, 8], [5, 3, -1, -1]]
    hybrid = HybridRetriever((Fixed(a), Fixed(b)), "a+b", "a+b")
    assert hybrid.c == HYBRID_RRF_C == 60.0
    keys, scores = hybrid.search(["q1", "q2"], 3)
    for row in range(2):
        want = fuse([a[row][:3], b[row][:3]], c=HYBRID_RRF_C)[:3]
        assert keys[row, : len(want)].tolist() == [key for key, _, _ in want]
        assert scores[row, : len(want)].tolist() == pytest.approx([value for _, value, _ in want])
    assert keys.tolist() == [[4, 2, 9], [3, 5, -1]]  # 4 and 2 tie: the first part's order


def test_the_pool_depth_counts_only_when_the_order_reranks() -> None:
    # a retrieval-order recipe has no pool: its candidates cannot make a second name for the same ranking
    assert parse("gloss candidates=6") == PRESETS["gloss"] and parse("gloss candidates=6").name() == "gloss"
    assert parse("rerank candidates=6").pool() == PRESETS["gloss"]
    assert parse("rerank candidates=6").candidates == 6


class _Fixed:
    """A retriever that returns the same two items for every query, fewer columns than K."""

    name = "fixed"
    description = "fixed"

    def search(self, texts: list[str], k: int, *, tick: Any = None) -> tuple[Any, Any]:
        keys = np.array([[7, 8]] * len(texts), dtype=np.int64)
        return keys, np.array([[2.0, 1.0]] * len(texts), dtype=np.float32)


def test_a_lead_list_keeps_what_the_queries_found_when_they_return_fewer_than_k() -> None:
    from gloss_cli.ranking import rank_users

    lead = np.array([[1, 2, 3, 4, 5]], dtype=np.int64)
    merged = rank_users(
        parse("no-model"),
        [["Title: x"]],
        [set()],
        k=5,
        retriever=_Fixed(),
        lead=lead,  # type: ignore[arg-type]
    )
    keys = [key for key, _, _ in merged[0]]
    # lead weight 1: 1/2, 1/3, 1/4, 1/5 ...; the title's list weight 1/2: item 7 at 0.5/2 ties item 3 (lead first)
    assert keys == [1, 2, 3, 7, 4]
