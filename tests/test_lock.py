"""The project lock across processes, and what a stopped or killed stage leaves behind (nothing, or a leftover that the
next stage removes). The children are real processes: flock and signals are what is under test."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from gloss_cli.cli import app
from gloss_cli.errors import GlossError
from gloss_cli.project import LOCK, Project
from tests.conftest import REPO

runner = CliRunner()
ENV = os.environ | {"PYTHONPATH": str(REPO)}

# Waits for the go file, then takes the lock (retrying while it is held) and logs entering and leaving, with a sleep
# in between; a takeover message goes to stdout.
WRITER = """
import os, sys, time
from pathlib import Path
from gloss_cli.console import Reporter
from gloss_cli.errors import GlossError
from gloss_cli.project import Project

class Say(Reporter):
    def warn(self, message):
        print(message, flush=True)

project, log, go = Project(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
print("ready", flush=True)
while not go.exists():
    time.sleep(0.001)
while True:
    try:
        with project.lock("writer", Say()):
            with log.open("a") as fh:
                fh.write(f"in {os.getpid()} {time.monotonic_ns()}\\n")
            time.sleep(0.15)
            with log.open("a") as fh:
                fh.write(f"out {os.getpid()} {time.monotonic_ns()}\\n")
        break
    except GlossError:
        time.sleep(0.002)
"""

# A stage that writes a file, says so, then sleeps until it is stopped.
SLOW_STAGE = """
import sys, time
from gloss_cli.project import Project
from gloss_cli.signals import Interrupted

project = Project(sys.argv[1])
try:
    with project.lock("gloss slow"), project.run_stage("slow", {"n": 1}, command="gloss slow") as stage:
        (stage.dir / "part.txt").write_text("half")
        print("ready", flush=True)
        time.sleep(120)
except Interrupted as exc:
    sys.exit(exc.exit_code)
"""

# `gloss data` with its table-building step slowed down, run as the real CLI.
SLOW_DATA = """
import sys, time
import gloss_cli.data
from gloss_cli.cli import main

def slow(*args, **kwargs):
    print("ready", flush=True)
    time.sleep(120)

gloss_cli.data.prepare = slow
sys.argv = ["gloss", *sys.argv[1:]]
main()
"""


def _start(script: str, *args: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", script, *args], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line == "ready\n", proc.communicate()[1]
    return proc


@pytest.fixture
def with_data(synthetic: Path) -> Iterator[Project]:
    assert runner.invoke(app, ["data", "--source", str(synthetic), "-p", "p", "-q"]).exit_code == 0
    yield Project("p")


def _dead_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(done.stdout)


def test_writers_started_at_once_never_overlap(tmp_path: Path) -> None:
    """Five processes race for a project whose lock was left by a dead writer: one takes it over, then each gets it
    in turn; their critical sections never overlap and no holder file remains."""
    project = Project("p")
    project.root.mkdir()
    stale = {"pid": _dead_pid(), "host": socket.gethostname(), "since": "x", "command": "gloss data"}
    (project.root / LOCK).write_text(json.dumps(stale))
    log, go = tmp_path / "log.txt", tmp_path / "go"
    procs = [_start(WRITER, "p", str(log), str(go)) for _ in range(5)]
    go.touch()
    outputs = [proc.communicate(timeout=120) for proc in procs]
    assert [proc.returncode for proc in procs] == [0] * 5, [err for _, err in outputs]
    lines = [line.split() for line in log.read_text().splitlines()]
    assert len(lines) == 10
    for enter, leave in zip(lines[::2], lines[1::2], strict=True):
        assert enter[0] == "in" and leave[0] == "out" and enter[1] == leave[1]  # nobody entered in between
    assert [int(line[2]) for line in lines] == sorted(int(line[2]) for line in lines)
    assert len({line[1] for line in lines}) == 5
    takeovers = [out for out, _ in outputs if "took over the lock of 'gloss data'" in out]
    assert len(takeovers) == 1  # the stale holder is taken over once, not by two waiters
    assert not (project.root / LOCK).exists()
    with project.lock("after"):  # free at once
        pass


def test_a_running_holder_is_named_and_a_killed_one_taken_over(with_data: Project, synthetic: Path) -> None:
    proc = _start(SLOW_STAGE, "p")
    refused = runner.invoke(app, ["eval", "--recipe", "lis-paper users=all", "-p", "p"])
    assert refused.exit_code == 1
    error, hint = refused.stderr.splitlines()
    assert f"is locked by 'gloss slow' (pid {proc.pid}, user " in error and socket.gethostname() in error
    assert hint == f"hint: Wait for it to finish, or stop it: kill {proc.pid}."
    proc.kill()  # SIGKILL: no cleanup runs; its holder file and temp folder stay behind
    proc.wait()
    assert (with_data.root / LOCK).is_file() and list(with_data.root.glob(".tmp-slow-*"))
    result = runner.invoke(app, ["eval", "--recipe", "lis-paper users=all", "-p", "p"])
    assert result.exit_code == 0, result.output
    assert f"took over the lock of 'gloss slow' (pid {proc.pid}" in result.stderr
    assert "removed what an interrupted gloss left" in result.stderr and ".tmp-slow-" in result.stderr
    assert not list(with_data.root.glob(".tmp-*")) and not (with_data.root / LOCK).exists()


def test_an_unreadable_lock_file_is_taken_over(synthetic: Path) -> None:
    Path("p").mkdir()
    Path("p", LOCK).write_bytes(b"\x00\xffnot json")
    result = runner.invoke(app, ["data", "--source", str(synthetic), "-p", "p", "-q"])
    assert result.exit_code == 0, result.output
    assert f"took over the lock of an unreadable {LOCK}" in result.stderr
    assert not Path("p", LOCK).exists()


def test_a_lock_from_another_host_is_respected_even_without_an_os_lock() -> None:
    Path("p").mkdir()
    Path("p", LOCK).write_text(json.dumps({"pid": 1, "host": "elsewhere", "since": "x", "command": "c"}))
    with pytest.raises(GlossError, match="on elsewhere") as caught, Project("p").lock("gloss data"):
        pass
    assert caught.value.hint and "delete" in caught.value.hint
    assert Path("p", LOCK).is_file()  # still theirs


def test_sigterm_during_a_stage_leaves_nothing(with_data: Project) -> None:
    before = with_data.manifest_path.read_bytes()
    proc = _start(SLOW_STAGE, "p")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    assert with_data.manifest_path.read_bytes() == before
    assert not (with_data.root / LOCK).exists() and not (with_data.root / "slow").exists()
    assert not list(with_data.root.glob(".tmp-*"))


def test_sigterm_during_gloss_data_is_an_interruption(with_data: Project, synthetic: Path) -> None:
    before = with_data.manifest_path.read_bytes()
    outputs = sorted((p.name, p.stat().st_mtime_ns) for p in (with_data.root / "data").iterdir())
    proc = _start(SLOW_DATA, "data", "--source", str(synthetic), "--dedup", "-p", "p")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    # 130 while the CLI maps every interruption to Ctrl-C's code; 143 (128 + SIGTERM) once it uses exit_code
    assert proc.returncode == 143, err
    assert err.splitlines()[-2].startswith("error: Interrupted") and err.splitlines()[-1].startswith("hint:")
    assert with_data.manifest_path.read_bytes() == before
    assert sorted((p.name, p.stat().st_mtime_ns) for p in (with_data.root / "data").iterdir()) == outputs
    assert not (with_data.root / LOCK).exists() and not list(with_data.root.glob(".tmp-*"))


@pytest.mark.parametrize(
    ("umask", "folder", "file"), [(0o022, 0o755, 0o644), (0o002, 0o775, 0o664)], ids=["umask-022", "umask-002"]
)
def test_published_stage_follows_the_umask(synthetic: Path, umask: int, folder: int, file: int) -> None:
    old = os.umask(umask)
    try:
        assert runner.invoke(app, ["data", "--source", str(synthetic), "-p", "p", "-q"]).exit_code == 0
    finally:
        os.umask(old)
    assert stat.S_IMODE(Path("p/data").stat().st_mode) == folder
    files = [p for p in Path("p/data").rglob("*") if p.is_file()] + [Path("p/manifest.json")]
    assert len(files) > 3 and {stat.S_IMODE(p.stat().st_mode) for p in files} == {file}


def test_leftovers_are_removed_when_a_stage_starts(with_data: Project) -> None:
    root = with_data.root
    (root / ".tmp-data-x1").mkdir()
    (root / ".tmp-data-x1" / "items.parquet").write_text("half")
    (root / ".old-data-x2").mkdir()
    (root / ".manifest.json.x3.tmp").write_text("{")
    result = runner.invoke(app, ["eval", "--recipe", "lis-paper users=all", "-p", "p"])
    assert result.exit_code == 0, result.output
    assert result.stderr.count("removed what an interrupted gloss left") == 1
    assert not list(root.glob(".tmp-*")) and not list(root.glob(".old-*")) and not list(root.glob(".*.tmp"))
    assert sorted(p.name for p in root.iterdir()) == [".gloss.flock", "data", "eval", "index", "manifest.json"]
