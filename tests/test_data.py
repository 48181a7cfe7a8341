from __future__ import annotations

import ast
import gzip
import json
from pathlib import Path

import polars as pl
from typer.testing import CliRunner

from gloss_cli.cli import app
from gloss_cli.data import build_tables
from gloss_cli.prompt import build_prompt
from gloss_cli.sources import Source, read_source
from tests.conftest import synthetic_rows
from tests.reference import reference_splits

runner = CliRunner()


def _as_dict(frame: pl.DataFrame) -> dict[str, tuple[list[str], str]]:
    return {r["user_id"]: (r["history"], r["target"]) for r in frame.iter_rows(named=True)}


def _tables(source: Path, **kwargs):  # type: ignore[no-untyped-def]
    inter, items = read_source(Source("compact", "test", source / "interactions.csv.gz", source / "items.csv.gz"))
    return build_tables(inter, items, **kwargs)


def test_polars_pipeline_equals_the_plain_python_reference(synthetic: Path) -> None:
    inter, items = synthetic_rows()
    ref = reference_splits([(u, i, int(t)) for u, i, t in inter], [(i, str(t)) for i, t in items])
    tables = _tables(synthetic)
    assert dict(tables.items.iter_rows()) == ref["titles"]
    assert {r["user_id"]: r["item_ids"] for r in tables.sequences.iter_rows(named=True)} == ref["sequences"]
    for split in ("train", "validation", "test"):
        got = _as_dict(tables.splits[split])
        assert got == {u: (list(h), t) for u, (h, t) in ref[split].items()}, split
    assert tables.stats["validation_users"] == len(ref["validation"]) > 0
    assert tables.stats["test_users"] == len(ref["sequences"])
    assert all(len(t.split()) <= 25 for t in tables.items["title"])


def test_all_prefixes_are_every_prefix_before_the_held_out_items(synthetic: Path) -> None:
    tables = _tables(synthetic, train_examples="all-prefixes")
    sequences = {r["user_id"]: r["item_ids"] for r in tables.sequences.iter_rows(named=True)}
    validation = set(tables.splits["validation"]["user_id"])
    expected = sum(len(s) - (2 if u in validation else 1) - 1 for u, s in sequences.items())
    train = tables.splits["train"]
    assert train.height == expected > tables.stats["users"]
    for row in train.iter_rows(named=True):
        seq, hist = sequences[row["user_id"]], row["history"]
        assert len(hist) >= 1
        assert seq[: len(hist) + 1] == [*hist, row["target"]]
        assert len(hist) + 1 <= len(seq) - (2 if row["user_id"] in validation else 1)


def test_dedup_drops_exact_duplicates_only(synthetic: Path) -> None:
    kept = _tables(synthetic).stats["interactions"]
    deduped = _tables(synthetic, dedup=True)
    assert deduped.stats["interactions"] < kept
    seq = deduped.sequences
    assert (seq["n"] == seq["n_dedup"]).all()


def test_original_mcauley_format_gives_the_same_tables(synthetic: Path, tmp_path: Path) -> None:
    inter, items = synthetic_rows()
    folder = tmp_path / "orig"
    folder.mkdir()
    reviews = "".join(
        json.dumps({"reviewerID": u, "asin": i, "unixReviewTime": t, "helpful": [0, 0], "overall": 5.0}) + "\n"
        for u, i, t in inter
    )
    # meta lines are Python literals (single quotes), which json cannot read
    meta = "".join(
        repr({"asin": i, "title": t, "related": {"also_bought": ["X"]}} if t else {"asin": i, "price": 1.0}) + "\n"
        for i, t in items
    )
    assert ast.literal_eval(meta.splitlines()[1])["asin"] == items[1][0]
    (folder / "reviews_Beauty_5.json.gz").write_bytes(gzip.compress(reviews.encode()))
    (folder / "meta_Beauty.json.gz").write_bytes(gzip.compress(meta.encode()))
    result = runner.invoke(app, ["data", "--source", str(folder), "-p", "orig-proj", "--json", "-q"])
    assert result.exit_code == 0, result.output
    compact = _tables(tmp_path / "src")
    for split in ("train", "validation", "test"):
        got = pl.read_parquet(Path("orig-proj/data") / f"{split}.parquet")
        assert _as_dict(got) == _as_dict(compact.splits[split])


def test_cli_data_end_to_end_writes_outputs_and_manifest(synthetic: Path) -> None:
    result = runner.invoke(app, ["data", "--source", str(synthetic), "-p", "proj", "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["dataset"] == "beauty"
    # a synthetic set is not the canonical 5-core: gloss must say so
    assert any("differs from the canonical" in w for w in doc["warnings"])
    for name in ("items", "sequences", "train", "validation", "test"):
        assert Path(f"proj/data/{name}.parquet").is_file()
    manifest = json.loads(Path("proj/manifest.json").read_text())
    assert manifest["schema_version"] == 1
    stage = manifest["stages"]["data"]
    assert stage["params"]["dataset"] == "beauty" and stage["params"]["validation_seed"] == 42
    assert {e["role"] for e in stage["inputs"]} == {"interactions", "items"}
    assert all(len(e["sha256"]) == 64 for e in stage["inputs"] + stage["outputs"])
    assert {e["path"] for e in stage["outputs"]} >= {"data/train.parquet", "data/stats.json"}
    assert stage["versions"]["polars"] == pl.__version__
    assert stage["duration_s"] >= 0 and stage["fingerprint"]
    assert stage["metrics"]["test_users"] == doc["stats"]["test_users"]
    assert not Path("proj/.gloss.lock").exists()
    assert [p.name for p in Path("proj").iterdir() if p.name.startswith(".tmp")] == []

    status = runner.invoke(app, ["status", "-p", "proj", "--json"])
    assert json.loads(status.stdout)["stages"][0]["state"] == "done"


def test_gloss_data_dir_mirror_is_used(synthetic: Path, tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    mirror = tmp_path / "mirror"
    (mirror / "toys").mkdir(parents=True)
    for name in ("interactions.csv.gz", "items.csv.gz"):
        (mirror / "toys" / name).write_bytes((synthetic / name).read_bytes())
    monkeypatch.setenv("GLOSS_DATA_DIR", str(mirror))
    result = runner.invoke(app, ["data", "-d", "toys", "-p", "p", "--json", "-q"])
    assert result.exit_code == 0, result.output
    stage = json.loads(Path("p/manifest.json").read_text())["stages"]["data"]
    assert stage["params"]["source"] == {"kind": "compact", "origin": "GLOSS_DATA_DIR"}


def test_prompt_is_the_papers_text_exactly() -> None:
    prompt = build_prompt(["Lipstick Red", "Mascara"])
    assert prompt == (
        "Below is a customer's purchase history on Amazon, listed in chronological order (earliest to latest). \n"
        "Each item is represented by the following format: Title: <item title> \n"
        "Based on this history, predict **only one** item the customer is most likely to purchase next in the "
        "same format.\n\n### Purchase history:\nTitle: Lipstick Red\nTitle: Mascara\n\n### Next item:\n"
    )
