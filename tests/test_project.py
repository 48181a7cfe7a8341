from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from gloss_cli.cli import app
from gloss_cli.errors import GlossError
from gloss_cli.project import Project, atomic_write_text

runner = CliRunner()


def test_status_of_a_new_project_names_the_first_command() -> None:
    result = runner.invoke(app, ["status", "-p", "fresh", "--json"])
    assert result.exit_code == 0
    doc = json.loads(result.stdout)
    assert doc["exists"] is False
    assert doc["stages"][0] == {
        "name": "data",
        "state": "missing",
        "reason": "never run",
        "command": "gloss data --dataset beauty",
        "finished": None,
    }
    assert doc["next"] == "gloss data --dataset beauty --project fresh"
    assert not Path("fresh").exists()  # status only reads


def test_changed_output_makes_the_stage_modified(synthetic: Path) -> None:
    assert runner.invoke(app, ["data", "--source", str(synthetic), "-p", "p", "-q"]).exit_code == 0
    Path("p/data/test.parquet").write_bytes(b"garbage")
    states = Project("p").status()
    assert states[0].state == "modified" and "changed on disk" in states[0].reason
    table = runner.invoke(app, ["status", "-p", "p"])
    assert "modified" in table.stdout and f"next: gloss data --source {synthetic} --project p" in table.stdout


def test_changed_source_makes_the_stage_stale(synthetic: Path) -> None:
    assert runner.invoke(app, ["data", "--source", str(synthetic), "-p", "p", "-q"]).exit_code == 0
    data = (synthetic / "items.csv.gz").read_bytes()
    (synthetic / "items.csv.gz").write_bytes(data + b"")  # same bytes: still done
    assert Project("p").status()[0].state == "done"
    (synthetic / "items.csv.gz").write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    assert "input" in Project("p").status()[0].reason


def test_rerun_replaces_outputs_and_fingerprint_follows_params(synthetic: Path) -> None:
    assert runner.invoke(app, ["data", "--source", str(synthetic), "-p", "p", "-q"]).exit_code == 0
    first = Project("p").stage("data")
    args = ["data", "--source", str(synthetic), "-p", "p", "-q", "--train-examples", "all-prefixes"]
    assert runner.invoke(app, args).exit_code == 0
    second = Project("p").stage("data")
    assert first and second and first["fingerprint"] != second["fingerprint"]
    assert second["params"]["train_examples"] == "all-prefixes"
    assert sorted(p.name for p in Path("p").iterdir()) == [".gloss.flock", "data", "manifest.json"]


def test_lock_refuses_a_second_writer_with_who_and_since(synthetic: Path) -> None:
    project = Project("p")
    with project.lock("gloss data --dataset beauty"):
        result = runner.invoke(app, ["data", "--source", str(synthetic), "-p", "p"])
        assert result.exit_code == 1
        line = result.stderr.splitlines()[0]
        assert "is locked by 'gloss data --dataset beauty'" in line
        assert f"pid {os.getpid()}" in line and socket.gethostname() in line and "since 20" in line
        assert not project.exists()
    assert not (project.root / ".gloss.lock").exists()


def test_a_lock_left_by_a_dead_process_is_taken_over(synthetic: Path) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    Path("p").mkdir()
    Path("p/.gloss.lock").write_text(
        json.dumps({"pid": int(dead.stdout), "host": socket.gethostname(), "since": "x", "command": "gloss data"})
    )
    assert runner.invoke(app, ["data", "--source", str(synthetic), "-p", "p", "-q"]).exit_code == 0


def test_lock_held_on_another_host_is_respected() -> None:
    Path("p").mkdir()
    Path("p/.gloss.lock").write_text(json.dumps({"pid": 1, "host": "elsewhere", "since": "x", "command": "c"}))
    with pytest.raises(GlossError, match="on elsewhere"), Project("p").lock("gloss data"):
        pass


def test_failed_stage_leaves_old_outputs_and_manifest(synthetic: Path) -> None:
    project = Project("p")
    with project.lock("t"), project.run_stage("data", {"a": 1}, command="t") as stage:
        (stage.dir / "x.txt").write_text("one")
    before = project.manifest_path.read_text()
    with (
        pytest.raises(RuntimeError),
        project.lock("t"),
        project.run_stage("data", {"a": 2}, command="t") as stage,
    ):
        (stage.dir / "x.txt").write_text("two")
        raise RuntimeError("boom")
    assert project.manifest_path.read_text() == before
    assert Path("p/data/x.txt").read_text() == "one"
    assert sorted(p.name for p in Path("p").iterdir()) == [".gloss.flock", "data", "manifest.json"]


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path: Path) -> None:
    target = tmp_path / "m.json"
    target.write_text("old")

    with pytest.raises(TypeError):
        atomic_write_text(target, object())  # type: ignore[arg-type]  # fails inside the write
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]


def test_env_var_selects_the_project(synthetic: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GLOSS_PROJECT", "from-env")
    assert runner.invoke(app, ["data", "--source", str(synthetic), "-q"]).exit_code == 0
    assert Path("from-env/manifest.json").is_file()
