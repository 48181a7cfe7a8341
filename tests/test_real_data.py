"""The real Amazon 2014 5-core mirror: gloss must reproduce the canonical counts exactly."""

from __future__ import annotations

import csv
import gzip
import io
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from gloss_cli.cli import app
from gloss_cli.sources import DATASETS

runner = CliRunner()
pytestmark = pytest.mark.slow


@pytest.mark.parametrize("name", list(DATASETS))
def test_counts_match_the_canonical_5core(name: str, shared_data: Path) -> None:
    result = runner.invoke(app, ["data", "-d", name, "--source", str(shared_data / name), "-p", name, "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["warnings"] == []
    stats = doc["stats"]
    for key, want in DATASETS[name].canonical.items():
        assert stats[key] == want, key


def test_beauty_splits_equal_the_plain_python_reference(shared_data: Path) -> None:
    import polars as pl

    from tests.reference import reference_splits

    def rows(path: Path) -> list[list[str]]:
        return list(csv.reader(io.StringIO(gzip.decompress(path.read_bytes()).decode())))[1:]

    inter = [(u, i, int(t)) for u, i, t in rows(shared_data / "beauty" / "interactions.csv.gz")]
    items = [(i, t) for i, t in rows(shared_data / "beauty" / "items.csv.gz")]
    ref = reference_splits(inter, items)
    args = ["data", "--source", str(shared_data / "beauty"), "-p", "b", "-q"]
    assert runner.invoke(app, args).exit_code == 0
    for split in ("train", "validation", "test"):
        got = pl.read_parquet(f"b/data/{split}.parquet")
        assert {r["user_id"]: (r["history"], r["target"]) for r in got.iter_rows(named=True)} == {
            u: (list(h), t) for u, (h, t) in ref[split].items()
        }
