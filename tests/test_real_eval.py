"""Reference numbers on the real Beauty test split (22,363 users)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from gloss_cli.cli import app

runner = CliRunner()
pytestmark = pytest.mark.slow


def test_lis_bm25_paper_protocol_reproduces_glosss_numbers(shared_data: Path) -> None:
    assert runner.invoke(app, ["data", "--source", str(shared_data / "beauty"), "-p", "b", "-q"]).exit_code == 0
    result = runner.invoke(app, ["eval", "--recipe", "lis-paper users=all", "-p", "b", "--json", "-q"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["users"] == 22_363
    # GLoSS's published per-user LIS results average to 0.0438 / 0.0235 (their ties in bm25s's internal order) ...
    assert doc["metrics"]["recall@5"] == pytest.approx(0.0438, abs=0.001)
    assert doc["metrics"]["ndcg@5"] == pytest.approx(0.0235, abs=0.001)
    # ... and gloss's, ties broken by item id (README, docs/RESULTS.md), on every machine with the lock
    assert doc["metrics"]["recall@5"] == pytest.approx(0.0431, abs=0.0001)
    assert doc["metrics"]["ndcg@5"] == pytest.approx(0.0230, abs=0.0001)
    seg = json.loads(runner.invoke(app, ["segments", "-p", "b", "--json"]).stdout)
    assert [r["users"] for r in seg["segments"]] == [7_180, 12_996, 2_187]  # the paper's Beauty segments


def test_transitions_baseline_on_beauty(shared_data: Path) -> None:
    """docs/notebook/2026-11-30-session-10.md: the transitions list alone on every Beauty test user, and with LIS."""
    assert runner.invoke(app, ["data", "--source", str(shared_data / "beauty"), "-p", "b", "-q"]).exit_code == 0
    alone = json.loads(
        runner.invoke(app, ["eval", "--recipe", "transitions users=all", "-p", "b", "--json", "-q"]).stdout
    )
    assert alone["users"] == 22_363
    assert alone["metrics"]["recall@5"] == pytest.approx(0.0680, abs=0.0001)
    assert alone["metrics"]["ndcg@5"] == pytest.approx(0.0503, abs=0.0001)
    args = ["eval", "--recipe", "no-model users=all"]  # the transitions list, then the last item's title, fused
    with_lis = json.loads(runner.invoke(app, [*args, "-p", "b", "--json", "-q"]).stdout)
    assert with_lis["users"] == 22_363
    assert with_lis["metrics"]["recall@5"] == pytest.approx(0.0729, abs=0.0001)
    assert with_lis["metrics"]["ndcg@5"] == pytest.approx(0.0528, abs=0.0001)
