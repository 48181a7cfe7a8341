"""The sasrec list outside `gloss eval`: `gloss recommend` serves it (the same lists eval scores, given the same
history and knowledge), and `gloss rerank` scores pools it leads."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
from typer.testing import CliRunner

from gloss_cli import sasrec
from gloss_cli.cli import app
from gloss_cli.data import load_split
from gloss_cli.project import Project
from gloss_cli.recipe import parse
from gloss_cli.recommend import SASREC_QUERY, TRANSITIONS_QUERY, Recommender
from tests.test_eval import _project
from tests.test_sasrec import TINY

runner = CliRunner()


def _with_sasrec(synthetic: Path) -> Path:
    """Project ``p``: the synthetic data and a tiny SASRec trained for 2 epochs."""
    project = _project(synthetic)
    result = runner.invoke(app, ["sasrec", *TINY, "--dropout", "0.1", "--epochs", "2", "-p", "p", "-q"])
    assert result.exit_code == 0, result.output
    return project


def _run_lists(path: Path) -> dict[str, list[str]]:
    """Per user, the item ids of an eval run's run.trec, best first."""
    lists: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        user, _, item, *_ = line.split()
        lists.setdefault(user, []).append(item)
    return lists


def _knowing_what_eval_knows(rec: Recommender, project: Path) -> list[str]:
    """Give ``rec`` the knowledge `gloss eval` ranks a test target with: each user's test history (the sequence
    without its test item) and, for the transitions list, the train split's sequences; the test users."""
    test = load_split(project / "data", "test")
    rec.histories = dict(zip(test["user_id"].to_list(), test["history"].to_list(), strict=True))
    train = sasrec.train_sequences(load_split(project / "data", "train"))
    rec.sequences = train.select("user_id", item_ids="seq")
    return test["user_id"].to_list()


def test_recommend_returns_the_lists_eval_scores(synthetic: Path) -> None:
    project = _with_sasrec(synthetic)
    served: dict[str, dict[str, list[str]]] = {}
    for text in ("lists=sasrec,transitions users=all", "sasrec", "sasrec seen=kept"):
        recipe = parse(text)
        result = runner.invoke(app, ["eval", "--recipe", text, "-k", "10", "-p", "p", "--json", "-q"])
        assert result.exit_code == 0, result.output
        evaluated = _run_lists(project / f"eval/{json.loads(result.stdout)['run']}/run.trec")
        rec = Recommender(Project(project), recipe=recipe, k=10)
        users = _knowing_what_eval_knows(rec, project)
        served[text] = {r.user_id or "": [i.item_id for i in r.items] for r in rec.for_users(users)}
        assert len(served[text]) == len(users) > 40 and sum(map(len, served[text].values())) > 100
        assert served[text] == {u: evaluated.get(u, []) for u in users}, text
    # the fusion and the history policy changed the lists: the comparisons above compared different things
    assert served["lists=sasrec,transitions users=all"] != served["sasrec"] != served["sasrec seen=kept"]


def test_recommend_with_sasrec_needs_no_language_model(synthetic: Path) -> None:
    project = _with_sasrec(synthetic)
    seq = pl.read_parquet(project / "data/sequences.parquet").row(2, named=True)
    args = ["recommend", "--user", seq["user_id"], "-p", "p", "-k", "5", "--json", "-q"]
    result = runner.invoke(app, [*args, "--recipe", "lists=sasrec,transitions"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert [q["text"] for q in doc["queries"]] == [SASREC_QUERY, TRANSITIONS_QUERY]
    assert 0 < len(doc["items"]) <= 5 and not {i["item_id"] for i in doc["items"]} & set(seq["item_ids"])
    # the sasrec list of the user's whole known sequence, the first list fused: its first item weighs 1 / 2, which
    # only its second item with the transitions list's first (1 / 3 + 1 / 4) beats
    model, _, _ = sasrec.load(Project(project), device="cpu")
    item_ids = pl.read_parquet(project / "data/items.parquet")["item_id"].to_list()
    key_of = {item: i for i, item in enumerate(item_ids)}
    (own,) = sasrec.rank(model, [seq["item_ids"]], key_of, depth=5, exclude_seen=True, device="cpu").tolist()
    assert item_ids[own[0]] in [i["item_id"] for i in doc["items"][:2]] and doc["items"][0]["query"] == 0
    assert {i["item_id"] for i in doc["items"] if i["query"] == 0} <= {item_ids[k] for k in own}
    # a typed-in history of no catalog title gives the model nothing to read: no list, not its padding's
    rec = Recommender(Project(project), recipe=parse("sasrec"), k=5)
    assert rec.for_history(["no such title"]).items == []
    assert [i.item_id for i in rec.for_history([pl.read_parquet(project / "data/items.parquet")["title"][0]]).items]
    bad = runner.invoke(app, [*args, "--recipe", "sasrec", "--backend", "hf"])
    assert bad.exit_code == 1 and "--backend does not apply to recipe sasrec" in bad.stderr


def test_torch_is_imported_for_the_sasrec_list_only(synthetic: Path) -> None:
    project = _with_sasrec(synthetic)
    user = pl.read_parquet(project / "data/sequences.parquet")["user_id"][0]
    code = (
        "import sys; from pathlib import Path\n"
        "from gloss_cli.project import Project; from gloss_cli.recipe import parse\n"
        "from gloss_cli.recommend import Recommender\n"
        "rec = Recommender(Project(Path('p')), recipe=parse(sys.argv[1]), k=5)\n"
        "items = rec.for_users([sys.argv[2]])[0].items\n"
        "print('TORCH', 'torch' in sys.modules, len(items) > 0)"
    )
    for recipe, torch in (("transitions", False), ("lists=sasrec,transitions", True)):
        run = subprocess.run([sys.executable, "-c", code, recipe, user], capture_output=True, text=True, check=True)
        assert f"TORCH {torch} True" in run.stdout, run.stderr


def test_rerank_scores_sasrec_pools_and_eval_orders_them(
    synthetic: Path, tiny: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from gloss_cli.ranking import rerank_stage

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    project = _project(synthetic)
    train = ["train", "-p", "p", "-q", "--model", str(tiny), "--max-steps", "1", "--batch-size", "8"]
    assert runner.invoke(app, train).exit_code == 0
    pool = "lists=sasrec,transitions candidates=5 users=all"
    rerank = ["rerank", "--recipe", f"{pool} order=lm", "-p", "p"]
    bad = runner.invoke(app, rerank)
    assert bad.exit_code == 1 and bad.stderr.splitlines()[:2] == [
        "error: No SASRec model in this project.",
        "hint: Run 'gloss sasrec' first.",
    ]
    assert not (project / "rerank").exists()
    assert runner.invoke(app, ["sasrec", *TINY, "--dropout", "0.1", "--epochs", "2", "-p", "p", "-q"]).exit_code == 0
    result = runner.invoke(app, [*rerank, "--json", "-q"])
    assert result.exit_code == 0, result.output
    stage = rerank_stage("test", parse(f"{pool} order=lm"), "bm25")
    assert stage == "rerank/test-sasrec+transitions-rrf-xseen-allusers-5-bm25"
    frame = pl.read_parquet(project / stage / "candidates.parquet")
    test_users = pl.read_parquet(project / "data/test.parquet")["user_id"].to_list()
    assert json.loads(result.stdout)["metrics"]["users"] == len(test_users)
    manifest = json.loads((project / "manifest.json").read_text())
    record = manifest["stages"][stage]
    assert record["upstream"]["sasrec"] == manifest["stages"]["sasrec"]["fingerprint"]
    assert record["params"]["sasrec"]["grid"][0]["hidden"] == 16 and record["params"]["transitions"]
    # the pools are eval's list of that recipe in retrieval order, at that depth
    result = runner.invoke(app, ["eval", "--recipe", pool, "-k", "5", "-p", "p", "--json", "-q"])
    assert result.exit_code == 0, result.output
    evaluated = _run_lists(project / f"eval/{json.loads(result.stdout)['run']}/run.trec")
    pools = frame.sort("user_id", "pool_rank").group_by("user_id", maintain_order=True).agg("item_id")
    assert dict(zip(pools["user_id"], pools["item_id"].to_list(), strict=True)) == evaluated
    assert frame.group_by("user_id").len()["len"].max() == 5
    for how in ("lm", "fused"):
        result = runner.invoke(app, ["eval", "--recipe", f"{pool} order={how}", "-k", "3", "-p", "p", "--json", "-q"])
        assert result.exit_code == 0, result.output
        run = json.loads(result.stdout)
        assert run["users"] == len(test_users) and run["source"] == stage
        assert run["run"] == f"sasrec+transitions-rrf-xseen-{how}5-allusers-none-test"  # no list retrieved
        assert "the sasrec list, then the transitions list" in run["protocol_description"]
        assert "sasrec: SASRec" in run["protocol_description"] and "its top 5 reordered" in run["protocol_description"]
        summary = json.loads((project / f"eval/{run['run']}/metrics.json").read_text())
        assert summary["sasrec"] == record["params"]["sasrec"]
        if how == "lm":  # each pool by the model's log-probability per title token
            lm = _run_lists(project / f"eval/{run['run']}/run.trec")
            user = pools.filter(pl.col("item_id").list.len() == 5)["user_id"][0]
            mine = frame.filter(pl.col("user_id") == user).with_columns(v=pl.col("logprob") / pl.col("tokens"))
            assert lm[user] == mine.sort("v", "pool_rank", descending=[True, False])["item_id"].to_list()[:3]
    # a SASRec of other data: one line, nothing written
    assert runner.invoke(app, ["data", "--source", str(synthetic), "-p", "p", "--ties", "shuffle", "-q"]).exit_code == 0
    before = (project / stage / "candidates.parquet").stat().st_mtime_ns
    bad = runner.invoke(app, rerank)
    assert bad.exit_code == 1 and "Traceback" not in bad.output
    assert bad.stderr.splitlines()[0].startswith("error: The SASRec model was trained on other data")
    assert (project / stage / "candidates.parquet").stat().st_mtime_ns == before
