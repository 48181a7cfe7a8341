"""Progress off a terminal (nohup, Slurm, CI, ``2> log``): plain lines at a steady pace instead of a live bar."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from gloss_cli.cli import app
from gloss_cli.console import LogTick, RichReporter, progress_interval

runner = CliRunner()
LINE = re.compile(
    r"^(?P<task>.+): (?P<done>[\d,]+)/(?P<total>[\d,]+) \((?P<pct>\d+)%\), [\d,.]+/s, (ETA|done in) \d+:\d\d:\d\d$"
)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_line_at_each_tenth_and_none_twice(capsys: pytest.CaptureFixture[str]) -> None:
    clock = Clock()
    tick = LogTick("retrieve", 1000, interval=30, clock=clock)
    for step in range(1, 1001):  # 10 items/s for 100 s: a tenth every 10 s, more than interval/6 apart
        clock.now = step / 10
        tick.advance()
    tick.finish()  # the last line already showed 100 %: no repeat
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 10 and all(LINE.match(line) for line in lines), lines
    assert lines[0] == "retrieve: 100/1,000 (10%), 10.00/s, ETA 0:01:30"
    assert lines[-1] == "retrieve: 1,000/1,000 (100%), 10.00/s, done in 0:01:40"


def test_a_line_every_interval_when_tenths_are_slow(capsys: pytest.CaptureFixture[str]) -> None:
    clock = Clock()
    tick = LogTick("epoch 1/3", None, interval=30, clock=clock)
    for step in range(1, 10):  # one step every 10 s, total unknown
        clock.now = 10.0 * step
        tick.advance()
        if step == 5:
            tick.update(description="epoch 1/3 · loss 2.5000 · 1,234 tok/s")  # as train.py reports its loss
    tick.finish()
    assert capsys.readouterr().err.splitlines() == [
        "epoch 1/3: 3, 0.10/s, elapsed 0:00:30",
        "epoch 1/3 · loss 2.5000 · 1,234 tok/s: 6, 0.10/s, elapsed 0:01:00",
        "epoch 1/3 · loss 2.5000 · 1,234 tok/s: 9, 0.10/s, elapsed 0:01:30",
    ]


def test_a_short_stage_stays_quiet_and_bytes_read_as_bytes(capsys: pytest.CaptureFixture[str]) -> None:
    clock = Clock()
    quick = LogTick("bm25 index", None, interval=30, clock=clock)
    clock.now = 1.0
    quick.finish()
    assert capsys.readouterr().err == ""
    download = LogTick("download x.gz", 50e6, interval=30, bytes_=True, clock=clock)
    clock.now = 41.0
    download.advance(20e6)
    assert capsys.readouterr().err.strip() == "download x.gz: 20.0 MB/50.0 MB (40%), 500.0 kB/s, ETA 0:01:00"


def test_the_interval_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    assert progress_interval() == 30
    monkeypatch.setenv("GLOSS_PROGRESS_INTERVAL", "2.5")
    assert progress_interval() == 2.5
    monkeypatch.setenv("GLOSS_PROGRESS_INTERVAL", "soon")
    assert progress_interval() == 30


def test_off_a_terminal_the_reporter_writes_lines(capsys: pytest.CaptureFixture[str]) -> None:
    with RichReporter().progress("scoring", 4) as tick:  # pytest's stderr is not a terminal
        assert isinstance(tick, LogTick)
    with RichReporter(quiet=True).progress("scoring", 4) as tick:
        assert not isinstance(tick, LogTick)


def test_eval_writes_progress_lines_to_a_log(synthetic: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """End to end: the CliRunner's stderr is not a terminal, like nohup's or Slurm's."""
    assert runner.invoke(app, ["data", "--source", str(synthetic), "-p", "p", "-q"]).exit_code == 0
    monkeypatch.setenv("GLOSS_PROGRESS_INTERVAL", "0")
    result = runner.invoke(app, ["eval", "--recipe", "lis-paper users=all", "-p", "p"])
    assert result.exit_code == 0, result.output
    lines = [m for m in map(LINE.match, result.stderr.splitlines()) if m and m["task"] == "retrieve (bm25)"]
    assert lines and lines[-1]["done"] == lines[-1]["total"] and lines[-1]["pct"] == "100", result.stderr
    assert "\x1b[" not in result.stderr  # plain text: no cursor movements or colours in a log
