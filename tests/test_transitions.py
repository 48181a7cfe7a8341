"""The transitions list (gloss_cli.transitions): counted from the train split only, checked against a plain loop,
and its uses in gloss eval (the recipes transitions, no-model and gloss, which fuse it first)."""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from typer.testing import CliRunner

from gloss_cli.cli import app
from gloss_cli.console import Reporter
from gloss_cli.transitions import DECAY, RECENT, ROUND, WINDOW, recommend, transition_counts
from tests.test_eval import _assert_refused, _gloss_file, _project

runner = CliRunner()


def _train(rows: list[tuple[list[str], str]]) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "user_id": [f"U{i}" for i in range(len(rows))],
            "history": [h for h, _ in rows],
            "target": [t for _, t in rows],
        }
    )


def _reference(train: pl.DataFrame, histories: list[list[str]], depth: int, exclude_seen: bool) -> list[list[str]]:
    """The definition, as plain loops."""
    weight: dict[tuple[str, str], float] = defaultdict(float)
    for history, target in zip(train["history"].to_list(), train["target"].to_list(), strict=True):
        seq = [*history, target]
        for t in range(len(seq)):
            for gap in range(1, WINDOW + 1):
                if t + gap < len(seq):
                    weight[seq[t], seq[t + gap]] += 1.0 / gap
    out = []
    for history in histories:
        score: dict[str, float] = defaultdict(float)
        for age, item in enumerate(reversed(history[-RECENT:])):
            for (a, b), w in weight.items():
                if a == item:
                    score[b] += w * DECAY**age
        ranked = sorted(
            (b for b in score if not (exclude_seen and b in history)), key=lambda b: (-round(score[b], ROUND), b)
        )
        out.append(ranked[:depth])
    return out


def test_pairs_are_weighted_by_gap_within_the_window() -> None:
    counts = transition_counts(_train([(["a", "b", "c"], "d"), (["a"], "b")]))
    weights = {(r["item"], r["next_item"]): r["weight"] for r in counts.iter_rows(named=True)}
    assert weights == pytest.approx(
        {("a", "b"): 2.0, ("a", "c"): 0.5, ("a", "d"): 1 / 3, ("b", "c"): 1.0, ("b", "d"): 0.5, ("c", "d"): 1.0}
    )


def test_recent_items_vote_with_decay_and_history_is_excluded() -> None:
    train = _train([(["x"], "p"), (["y"], "q"), (["x"], "y")])
    # the last item x votes 1 for p and for y (a tie: by id); y, one older, votes 0.5 for q; y is seen
    assert recommend(transition_counts(train), [["y", "x"]], depth=5, exclude_seen=True) == [["p", "q"]]
    assert recommend(transition_counts(train), [["y", "x"]], depth=5, exclude_seen=False) == [["p", "y", "q"]]
    assert recommend(transition_counts(train), [["never-followed"], []], depth=5, exclude_seen=True) == [[], []]


def test_lists_equal_the_plain_definition_on_the_synthetic_data(synthetic: Path) -> None:
    project = _project(synthetic)
    train = pl.read_parquet(project / "data/train.parquet")
    histories = pl.read_parquet(project / "data/test.parquet")["history"].to_list()
    for exclude_seen in (True, False):
        got = recommend(transition_counts(train), histories, depth=7, exclude_seen=exclude_seen)
        assert got == _reference(train, histories, 7, exclude_seen)
    assert any(got)


def test_held_out_items_are_never_counted(synthetic: Path) -> None:
    """The counts are those of every user's sequence without its test item, and without its validation item too
    for a validation user: what the model trains on, nothing held out."""
    project = _project(synthetic)
    data = project / "data"
    validation = set(pl.read_parquet(data / "validation.parquet")["user_id"].to_list())
    sequences = pl.read_parquet(data / "sequences.parquet")
    kept = [
        (seq[: -2 if user in validation else -1])
        for user, seq in zip(sequences["user_id"].to_list(), sequences["item_ids"].to_list(), strict=True)
    ]
    truncated = _train([(seq[:-1], seq[-1]) for seq in kept])
    assert transition_counts(pl.read_parquet(data / "train.parquet")).equals(transition_counts(truncated))


def test_all_prefix_examples_count_each_pair_once(synthetic: Path) -> None:
    last = _project(synthetic, "last")
    result = runner.invoke(
        app, ["data", "--source", str(synthetic), "-p", "ap", "--train-examples", "all-prefixes", "-q"]
    )
    assert result.exit_code == 0, result.output
    prefixes = pl.read_parquet("ap/data/train.parquet")
    assert prefixes.height > pl.read_parquet(last / "data/train.parquet").height
    assert transition_counts(prefixes).equals(transition_counts(pl.read_parquet(last / "data/train.parquet")))


def test_baseline_and_fusion_end_to_end(synthetic: Path, tmp_path: Path) -> None:
    project = _project(synthetic)
    base = json.loads(
        runner.invoke(app, ["eval", "--recipe", "transitions users=all", "-p", "p", "--json", "-q"]).stdout
    )
    run_name = "transitions-rrf-xseen-allusers-test"  # no retriever in the name: the list retrieves nothing
    assert base["run"] == run_name and base["retriever"] == "none"
    assert base["protocol_description"].startswith(f"recipe {run_name[:-5]}: the transitions list")
    assert "transitions: the items that followed" in base["protocol_description"]
    summary = json.loads((project / f"eval/{run_name}/metrics.json").read_text())
    assert summary["transitions"] == {"window": WINDOW, "recent": RECENT, "decay": DECAY, "counted_from": "train split"}
    manifest = json.loads((project / "manifest.json").read_text())
    assert set(manifest["stages"][f"eval/{run_name}"]["upstream"]) == {"data"}  # no index, no model
    test = pl.read_parquet(project / "data/test.parquet")
    expected = recommend(
        transition_counts(pl.read_parquet(project / "data/train.parquet")),
        test["history"].to_list(),
        depth=5,
        exclude_seen=True,
    )
    run: dict[str, list[str]] = defaultdict(list)
    for line in (project / f"eval/{run_name}/run.trec").read_text().splitlines():
        run[line.split()[0]].append(line.split()[2])
    assert [run.get(u, []) for u in test["user_id"].to_list()] == expected

    _gloss_file(project, tmp_path / "q.json")
    args = ["eval", "--queries", str(tmp_path / "q.json"), "-p", "p", "--json", "-q"]
    fused = json.loads(runner.invoke(app, [*args, "--recipe", "gloss"]).stdout)
    # a run made from a queries file carries the file's content hash (two files cannot share a run)
    assert re.fullmatch(r"gloss-bm25-test-[0-9a-f]{8}", fused["run"])
    assert fused["recipe"]["lists"] == ["transitions", "lis", "model"] and fused["source"] == "file:q.json"
    assert "recipe gloss: the transitions list, then the last item's title" in fused["protocol_description"]
    lists: dict[str, list[str]] = defaultdict(list)
    for line in Path(fused["folder"], "run.trec").read_text().splitlines():
        lists[line.split()[0]].append(line.split()[2])
    # the same as fusing, by hand, the transitions lists before the three queries' lists
    from gloss_cli.evaluate import with_lis_query
    from gloss_cli.index import open_index
    from gloss_cli.project import Project
    from gloss_cli.queries import load_gloss_json
    from gloss_cli.ranking import as_array, rank_users
    from gloss_cli.recipe import PRESETS, parse

    items = pl.read_parquet(project / "data/items.parquet")
    key_of = {item: i for i, item in enumerate(items["item_id"].to_list())}
    qs = with_lis_query(load_gloss_json(tmp_path / "q.json", test, dict(items.iter_rows()), 2), dict(items.iter_rows()))
    lead = np.full((len(qs.users), 5), -1)
    for u, row in enumerate(
        recommend(
            transition_counts(pl.read_parquet(project / "data/train.parquet")), qs.histories, depth=5, exclude_seen=True
        )
    ):
        lead[u, : len(row)] = [key_of[i] for i in row]
    index, _ = open_index(Project(project), "bm25", reporter=Reporter())
    seen = [{key_of[i] for i in h} for h in qs.histories]
    ranked = as_array(rank_users(PRESETS["gloss"], qs.queries, seen, k=5, retriever=index, lead=lead), 5)
    ids = items["item_id"].to_list()
    assert {u: [ids[k] for k in row if k >= 0] for u, row in zip(qs.users, ranked.tolist(), strict=True)} == lists
    without = rank_users(parse("lists=lis,model queries=2"), qs.queries, seen, k=5, retriever=index, lead=None)
    assert ranked.tolist() != as_array(without, 5).tolist()


def test_the_lead_list_is_fused_as_the_first_query() -> None:
    from gloss_cli.ranking import as_array, rank_users
    from gloss_cli.recipe import parse

    class Fixed:
        name = description = "fixed"

        def search(self, texts: list[str], k: int, *, tick: object = None) -> tuple[np.ndarray, np.ndarray]:
            keys = np.array([[1, 2, 3, 4, 5][:k], [2, 1, 6, 7, 8][:k]], dtype=np.int64)
            return keys, np.zeros(keys.shape, dtype=np.float32)

    queries, seen = [["a", "b"]], [{9}]
    plain = rank_users(parse("model queries=2"), queries, seen, k=3, retriever=Fixed(), lead=None)
    # weights 1 / (1 + rank), times 1/2 and 1/3 for the two queries: 1 = 1/4 + 1/9, 2 = 1/6 + 1/6, 3 = 1/8;
    # the lead [6, 9 (seen, skipped), 3] comes first, weight 1: 6 = 1/2 + 1/12, 3 = 1/3 + 1/8
    led = rank_users(
        parse("lists=transitions,model queries=2"), queries, seen, k=3, retriever=Fixed(), lead=np.array([[6, 9, 3]])
    )
    assert as_array(plain, 3).tolist() == [[1, 2, 3]] and as_array(led, 3).tolist() == [[6, 3, 1]]
    assert [q for _, _, q in led[0]] == [0, 0, 1]  # the list that found each item first: the lead is list 0


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--recipe", "transitions merge=top1"], "the transitions list is ranked, not a query: merge=top1"),
        (["--recipe", "paper lists=transitions,model"], "merge=top1 cannot take it"),
        (["--recipe", "lists=lis,transitions"], "lists are fused in the order sasrec, transitions, lis, model"),
        (["--recipe", "transitions", "--retriever", "e5"], "--retriever does not apply to recipe transitions"),
        (["--recipe", "popular"], "Unknown recipe 'popular'"),
        (["--recipe", "no-model order=fused"], "Stage 'rerank/test-no-model-20-bm25' has not run"),
    ],
)
def test_transitions_misuse_is_refused(synthetic: Path, extra: list[str], message: str) -> None:
    project = _project(synthetic)
    _assert_refused(["eval", "-p", "p", *extra], message, project)


def test_a_train_example_can_forget_the_pairs_of_its_own_target() -> None:
    from gloss_cli.transitions import own_pairs, recommend, transition_counts

    train = pl.DataFrame(
        {"user_id": ["u1", "u2", "u3"], "history": [["a", "b"], ["a", "b"], ["x", "b"]], "target": ["c", "d", "c"]}
    )
    counts = transition_counts(train)
    histories = [["a", "b"], ["a", "b"], ["x", "b"]]
    plain = recommend(counts, histories, depth=5, exclude_seen=True)
    forgot = recommend(counts, histories, depth=5, exclude_seen=True, forget=own_pairs(train, train))
    assert plain[0] == ["c", "d"] and plain[1] == ["c", "d"]  # c: u1's own target and u3's; d: u2's
    # u1 still finds c through u3's b->c (1), no longer above d (u2's b->d 1 + a->d 1/2 x 1/2); u2 knows d from nobody
    assert forgot[0] == ["d", "c"] and forgot[1] == ["c"] and forgot[2] == ["c", "d"]
    alone = train.filter(pl.col("user_id") != "u3")
    assert recommend(
        transition_counts(alone), histories[:2], depth=5, exclude_seen=True, forget=own_pairs(alone, alone)
    ) == [
        ["d"],
        ["c"],
    ]  # with u3 gone each sees only the other's target: never its own
