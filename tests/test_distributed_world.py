"""This process's place under torchrun's environment (gloss_cli.distributed.world)."""

from __future__ import annotations

import pytest

from gloss_cli.distributed import World, world
from gloss_cli.errors import GlossError


def test_one_process_without_torchrun(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert world() == World(0, 1, 0) and world().main and not world().several


def test_torchrun_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert world() == World(3, 4, 1) and not world().main and world().several


@pytest.mark.parametrize(("rank", "size"), [("4", "4"), ("x", "2"), ("0", "0")])
def test_a_wrong_environment_is_one_line(monkeypatch: pytest.MonkeyPatch, rank: str, size: str) -> None:
    monkeypatch.setenv("RANK", rank)
    monkeypatch.setenv("WORLD_SIZE", size)
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(GlossError, match="RANK"):
        world()


def test_gloss_run_under_torchrun_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from gloss_cli.cli import app

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    result = CliRunner().invoke(app, ["run", "-p", "p"])
    assert result.exit_code == 1 and "gloss run is one process" in result.output
    assert "Traceback" not in result.output
