"""gloss sasrec (gloss_cli.sasrec): trained on the train split only, early-stopped and chosen on validation,
deterministic with a seed, and scored by gloss eval through the recipe list sasrec."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from typer.testing import CliRunner

from gloss_cli import sasrec
from gloss_cli.cli import app
from gloss_cli.console import Reporter
from gloss_cli.data import load_items, load_split
from gloss_cli.project import Project
from tests.test_eval import _project

runner = CliRunner()
TINY = ["--hidden", "16", "--blocks", "1", "--batch-size", "16", "--seed", "3"]


def _inputs(project: Path) -> tuple[dict[str, int], pl.DataFrame, pl.DataFrame]:
    items = load_items(project / "data").get_column("item_id").to_list()
    key_of = {item: i for i, item in enumerate(items)}
    return (
        key_of,
        sasrec.train_sequences(load_split(project / "data", "train")),
        load_split(project / "data", "validation"),
    )


def test_training_sequences_hold_neither_validation_nor_test_items(synthetic: Path) -> None:
    """Each user's training sequence is their sequence without its test item, and without its validation item too
    for a validation user: by position, since an item may occur twice."""
    project = _project(synthetic)
    _, train, validation = _inputs(project)
    validation_users = set(validation.get_column("user_id").to_list())
    sequences = pl.read_parquet(project / "data/sequences.parquet")
    full = dict(zip(sequences["user_id"].to_list(), sequences["item_ids"].to_list(), strict=True))
    got = dict(zip(train["user_id"].to_list(), train["seq"].to_list(), strict=True))
    assert set(got) == set(full)
    for user, seq in full.items():
        assert got[user] == seq[: -2 if user in validation_users else -1]
    # and a validation user's training sequence is exactly the validation history
    for row in validation.iter_rows(named=True):
        assert got[row["user_id"]] == row["history"]


def test_encode_keeps_the_last_items_left_padded() -> None:
    key_of = {"a": 0, "b": 1, "c": 2}
    assert sasrec.encode([["a", "b", "c"], ["c"], []], key_of, 2).tolist() == [[2, 3], [0, 3], [0, 0]]


def test_loss_falls_and_a_seed_repeats_the_run(synthetic: Path) -> None:
    project = _project(synthetic)
    key_of, train, validation = _inputs(project)
    s = sasrec.Settings(hidden=16, blocks=1, batch_size=8, epochs=6, patience=6, dropout=0.1, seed=1)
    rows = sasrec.encode(train.get_column("seq").to_list(), key_of, s.max_len + 1)
    first, state = sasrec.fit(s, rows, validation, key_of, device="cpu", reporter=Reporter())
    again, state_again = sasrec.fit(s, rows, validation, key_of, device="cpu", reporter=Reporter())
    losses = [e["loss"] for e in first.epochs]
    assert len(losses) == 6 and losses[-1] < losses[0]
    strip = [{k: v for k, v in e.items() if k != "seconds"} for e in first.epochs]
    assert strip == [{k: v for k, v in e.items() if k != "seconds"} for e in again.epochs]
    assert all(torch.equal(state[k], state_again[k]) for k in state)
    other, _ = sasrec.fit(
        sasrec.Settings(**{**s.__dict__, "seed": 2}), rows, validation, key_of, device="cpu", reporter=Reporter()
    )
    assert [e["loss"] for e in other.epochs] != losses


def test_bce_loss_trains_too(synthetic: Path) -> None:
    project = _project(synthetic)
    key_of, train, validation = _inputs(project)
    s = sasrec.Settings(hidden=16, blocks=1, batch_size=8, epochs=4, patience=4, loss="bce")
    rows = sasrec.encode(train.get_column("seq").to_list(), key_of, s.max_len + 1)
    trial, _ = sasrec.fit(s, rows, validation, key_of, device="cpu", reporter=Reporter())
    assert trial.epochs[-1]["loss"] < trial.epochs[0]["loss"]


def test_stage_meta_and_eval_end_to_end(synthetic: Path) -> None:
    project = _project(synthetic)
    result = runner.invoke(
        app, ["sasrec", *TINY, "--dropout", "0.1", "--dropout", "0.3", "--epochs", "3", "-p", "p", "-q", "--json"]
    )
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)
    meta = json.loads((project / "sasrec/meta.json").read_text())
    assert [t["dropout"] for t in meta["trials"]] == [0.1, 0.3]  # every tried setting, with its numbers
    for trial in meta["trials"]:
        assert len(trial["epochs"]) == trial["epochs_run"] <= 3
        assert set(trial["epochs"][0]) == {"epoch", "loss", "recall@10", "ndcg@10", "seconds"}
    best = max(meta["trials"], key=lambda t: t["validation"]["ndcg@10"])
    assert meta["settings"]["dropout"] == best["dropout"] == printed["chosen"]["dropout"]
    assert meta["settings"]["seed"] == 3 and meta["device"] == "cpu" and meta["train_seconds"] > 0
    assert meta["items"] == pl.read_parquet(project / "data/items.parquet").height
    manifest = json.loads((project / "manifest.json").read_text())
    record = manifest["stages"]["sasrec"]
    assert record["upstream"] == {"data": manifest["stages"]["data"]["fingerprint"]}
    assert {Path(o["path"]).name for o in record["outputs"]} == {"model.pt", "meta.json"}

    run = json.loads(
        runner.invoke(app, ["eval", "--recipe", "sasrec", "-k", "5", "-k", "10", "-p", "p", "--json", "-q"]).stdout
    )
    assert run["run"] == "sasrec-test" and run["retriever"] == "none"
    assert run["users"] == pl.read_parquet(project / "data/test.parquet").height  # every user of the split
    assert {"recall@5", "ndcg@5", "recall@10", "ndcg@10"} <= set(run["metrics"])
    assert "history items excluded" in run["protocol_description"] and "sasrec: SASRec" in run["protocol_description"]
    assert "same-day ties in file order" in run["protocol_description"]
    summary = json.loads((project / "eval/sasrec-test/metrics.json").read_text())
    assert summary["sasrec"]["grid"][0]["dropout"] == 0.1
    assert "sasrec" in json.loads((project / "manifest.json").read_text())["stages"]["eval/sasrec-test"]["upstream"]


def test_history_excluded_or_kept(synthetic: Path) -> None:
    project = _project(synthetic)
    assert runner.invoke(app, ["sasrec", *TINY, "--dropout", "0.1", "--epochs", "2", "-p", "p", "-q"]).exit_code == 0
    model, _, device = sasrec.load(Project(project))
    key_of, _, _ = _inputs(project)
    test = pl.read_parquet(project / "data/test.parquet")
    histories = test.get_column("history").to_list()
    excluded = sasrec.rank(model, histories, key_of, depth=10, exclude_seen=True, device=device)
    kept = sasrec.rank(model, histories, key_of, depth=10, exclude_seen=False, device=device)
    seen = [{key_of[i] for i in h} for h in histories]
    assert not any(set(row.tolist()) & s for row, s in zip(excluded, seen, strict=True))
    assert any(set(row.tolist()) & s for row, s in zip(kept, seen, strict=True))
    # kept is the model's plain order; excluded is that order with the history dropped
    for row_kept, row_excluded, s in zip(kept, excluded, seen, strict=True):
        dropped = [k for k in row_kept.tolist() if k not in s]
        assert row_excluded.tolist()[: len(dropped)] == dropped
    for recipe, name in (("sasrec seen=kept", "sasrec-rrf-kept-allusers-test"), ("sasrec", "sasrec-test")):
        result = runner.invoke(app, ["eval", "--recipe", recipe, "-k", "10", "-p", "p", "-q"])
        assert result.exit_code == 0, result.output
        trec = (project / f"eval/{name}/run.trec").read_text().splitlines()
        lists: dict[str, list[str]] = {}
        for line in trec:
            user, _, item, *_ = line.split()
            lists.setdefault(user, []).append(item)
        rows = kept if "kept" in recipe else excluded
        inv = {k: i for i, k in key_of.items()}
        for u, user in enumerate(test.get_column("user_id").to_list()):
            assert lists.get(user, []) == [inv[k] for k in rows[u].tolist() if k >= 0]


def test_fused_with_transitions(synthetic: Path) -> None:
    project = _project(synthetic)
    assert runner.invoke(app, ["sasrec", *TINY, "--dropout", "0.1", "--epochs", "1", "-p", "p", "-q"]).exit_code == 0
    result = runner.invoke(app, ["eval", "--recipe", "lists=sasrec,transitions users=all", "-p", "p", "--json", "-q"])
    assert result.exit_code == 0, result.output
    run = json.loads(result.stdout)
    assert run["run"] == "sasrec+transitions-rrf-xseen-allusers-test"
    assert "the sasrec list, then the transitions list" in run["protocol_description"]
    bad = runner.invoke(app, ["eval", "--recipe", "lists=transitions,sasrec users=all", "-p", "p"])
    assert bad.exit_code == 1 and "Write lists=sasrec,transitions" in bad.stderr
    assert project.is_dir()


def test_a_model_of_other_data_is_refused(synthetic: Path) -> None:
    project = _project(synthetic)
    assert runner.invoke(app, ["sasrec", *TINY, "--dropout", "0.1", "--epochs", "1", "-p", "p", "-q"]).exit_code == 0
    result = runner.invoke(app, ["data", "--source", str(synthetic), "-p", "p", "--ties", "shuffle", "-q"])
    assert result.exit_code == 0, result.output
    before = sorted(p.name for p in (project / "eval").glob("*")) if (project / "eval").exists() else []
    result = runner.invoke(app, ["eval", "--recipe", "sasrec", "-p", "p"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.stderr.splitlines()[0].startswith("error: The SASRec model was trained on other data")
    assert result.stderr.splitlines()[1] == "hint: Run 'gloss sasrec' again."
    assert (sorted(p.name for p in (project / "eval").glob("*")) if (project / "eval").exists() else []) == before
    user = pl.read_parquet(project / "data/sequences.parquet")["user_id"][0]
    result = runner.invoke(app, ["recommend", "--user", user, "--recipe", "lists=sasrec,transitions", "-p", "p"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.stderr.splitlines()[0].startswith("error: The SASRec model was trained on other data")


@pytest.mark.slow
def test_real_beauty_a_few_steps(shared_data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On the real Beauty data: one short epoch of the default model trains, and eval scores every user."""
    monkeypatch.setenv("GLOSS_DATA_DIR", str(shared_data))
    assert runner.invoke(app, ["data", "--dataset", "beauty", "-p", "b", "-q"]).exit_code == 0
    result = runner.invoke(
        app, ["sasrec", "--dropout", "0.2", "--epochs", "1", "--batch-size", "512", "-p", "b", "-q", "--json"]
    )
    assert result.exit_code == 0, result.output
    run = json.loads(runner.invoke(app, ["eval", "--recipe", "sasrec", "-k", "10", "-p", "b", "--json", "-q"]).stdout)
    assert run["users"] == 22_363 and 0 < run["metrics"]["recall@10"] < 1
    assert np.isfinite(run["metrics"]["ndcg@10"])
