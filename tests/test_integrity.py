"""A stage checks the files it reads against the manifest before it uses them: a changed file stops it with the
stage to rebuild, a touched one (same bytes) does not, and unchanged files are trusted on size and mtime alone."""

from __future__ import annotations

import json
import os
from pathlib import Path

import polars as pl
import pytest
from typer.testing import CliRunner

from gloss_cli import project as project_module
from gloss_cli.cli import app
from gloss_cli.errors import GlossError
from gloss_cli.project import Project

runner = CliRunner()


@pytest.fixture
def data(synthetic: Path) -> Project:
    assert runner.invoke(app, ["data", "--source", str(synthetic), "-p", "p", "-q"]).exit_code == 0
    return Project("p")


def _redo(source: Path) -> str:
    return f"gloss data --source {source} --project p"


def _states() -> dict[str, str]:
    status = json.loads(runner.invoke(app, ["status", "-p", "p", "--json"]).stdout)
    return {s["name"]: s["state"] for s in status["stages"]}


def test_a_changed_input_stops_the_stage_and_names_what_to_rebuild(data: Project, synthetic: Path) -> None:
    items = pl.read_parquet("p/data/items.parquet")
    items.head(items.height - 1).write_parquet("p/data/items.parquet")  # one item fewer
    result = runner.invoke(app, ["eval", "--recipe", "lis-paper users=all", "-p", "p"])
    assert result.exit_code == 1
    error, hint = result.stderr.splitlines()
    assert error.startswith("error: data/items.parquet changed since stage 'data' wrote it")
    assert hint == f"hint: Rebuild stage 'data', then run this command again: {_redo(synthetic)}"
    assert not Path("p/eval").exists() and "eval/" not in json.dumps(data.manifest()["stages"])
    assert _states()["data"] == "modified"
    table = runner.invoke(app, ["status", "-p", "p"]).stdout
    assert "modified" in table and f"next: {_redo(synthetic)}" in table

    assert runner.invoke(app, ["data", "--source", str(synthetic), "-p", "p", "-q"]).exit_code == 0  # the hint's fix
    assert runner.invoke(app, ["eval", "--recipe", "lis-paper users=all", "-p", "p", "-q"]).exit_code == 0


def test_a_missing_input_is_named_too(data: Project) -> None:
    Path("p/data/train.parquet").unlink()
    with pytest.raises(GlossError, match=r"data/train\.parquet is missing since stage 'data' wrote it"):
        data.require("data")
    assert _states()["data"] == "modified"


def test_a_touched_input_still_works(data: Project) -> None:
    path = Path("p/data/items.parquet")
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 5_000_000_000))
    result = runner.invoke(app, ["eval", "--recipe", "lis-paper users=all", "-p", "p", "-q"])
    assert result.exit_code == 0, result.output
    assert _states()["data"] == "done"


def test_files_are_hashed_only_when_size_or_mtime_differ(data: Project, monkeypatch: pytest.MonkeyPatch) -> None:
    hashed: list[str] = []
    real = project_module.sha256_file
    monkeypatch.setattr(project_module, "sha256_file", lambda path: hashed.append(Path(path).name) or real(path))
    data.require("data")
    data.status()
    assert hashed == []
    path = Path("p/data/sequences.parquet")
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 1))
    data.require("data")
    assert hashed == ["sequences.parquet"]


def test_an_upstream_stage_is_verified_when_a_stage_starts(tmp_path: Path) -> None:
    """Whatever a stage read on the way, run_stage checks every upstream record before anything is written."""
    project = Project("q")
    with project.lock("t"), project.run_stage("data", {}, command="gloss data") as stage:
        (stage.dir / "a.txt").write_text("one")
    Path("q/data/a.txt").write_text("two")
    with (
        pytest.raises(GlossError, match=r"data/a\.txt changed since stage 'data'") as caught,
        project.lock("t"),
        project.run_stage("index/x", {}, command="gloss index", upstream=("data",)),
    ):
        pytest.fail("the stage body must not run")
    assert caught.value.hint == "Rebuild stage 'data', then run this command again: gloss data --project q"
    assert not Path("q/index").exists()


def test_same_bytes_keep_the_fingerprint(data: Project, synthetic: Path) -> None:
    """mtimes are in the record, not in the fingerprint: re-running data on the same source leaves eval done."""
    assert runner.invoke(app, ["eval", "--recipe", "lis-paper users=all", "-p", "p", "-q"]).exit_code == 0
    before = data.stage("data")
    assert runner.invoke(app, ["data", "--source", str(synthetic), "-p", "p", "-q"]).exit_code == 0
    after = data.stage("data")
    assert before and after and before["outputs"] != after["outputs"]  # new mtimes
    assert before["fingerprint"] == after["fingerprint"]
    assert set(_states().values()) <= {"done", "missing"}
