from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from gloss_cli import __version__
from gloss_cli.cli import app
from gloss_cli.completion import SHELLS, script
from tests.conftest import REPO

runner = CliRunner()


def test_version_and_short_help() -> None:
    assert runner.invoke(app, ["--version"]).stdout.strip() == f"gloss {__version__}"
    result = runner.invoke(app, ["-h"])
    assert result.exit_code == 0 and "data" in result.stdout and "status" in result.stdout
    data_help = runner.invoke(app, ["data", "-h"])
    assert "--project" in data_help.stdout and "Examples" in data_help.stdout


def test_help_does_not_import_heavy_libraries() -> None:
    code = (
        "import sys; from gloss_cli.cli import app\n"
        "try: app(['--help'], prog_name='gloss')\n"
        "except SystemExit: pass\n"
        "heavy = [m for m in ('torch', 'transformers', 'polars', 'sentence_transformers', 'bm25s', 'usearch')"
        " if m in sys.modules]\n"
        "print('HEAVY', heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "HEAVY []" in out


def test_python_dash_m_works() -> None:
    result = subprocess.run([sys.executable, "-m", "gloss_cli", "--version"], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == f"gloss {__version__}"


def test_completion_scripts_are_current() -> None:
    for shell, name in SHELLS.items():
        path = REPO / "completions" / name
        assert path.is_file(), f"missing {path}: run python -m gloss_cli.completion"
        assert path.read_text() == script(shell), f"{path} is stale: run python -m gloss_cli.completion"


def test_completion_answers_with_dataset_names(tmp_path: Path) -> None:
    env = {"_GLOSS_COMPLETE": "complete_bash", "COMP_WORDS": "gloss data --dataset s", "COMP_CWORD": "3"}
    import os

    result = subprocess.run([sys.executable, "-m", "gloss_cli"], capture_output=True, text=True, env=os.environ | env)
    assert result.stdout.split() == ["sports"]


def test_a_library_an_extra_left_out_is_one_line_naming_the_extra(
    synthetic: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`pip install -e '.[run]'` (the README's main command) leaves out the dense encoders and llama.cpp: a command
    that needs one says which extra installs it, exit code 1, no traceback, nothing written."""
    assert runner.invoke(app, ["data", "--source", str(synthetic), "-p", "p", "-q"]).exit_code == 0
    monkeypatch.setitem(sys.modules, "bm25s", None)  # import bm25s now raises ModuleNotFoundError
    result = runner.invoke(app, ["index", "--retriever", "bm25", "-p", "p"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    error, hint = result.stderr.strip().splitlines()[-2:]
    assert error == "error: bm25s is not installed; BM25 retrieval needs it."
    assert hint.startswith("hint: pip install") and "'.[bm25]'" in hint
    assert not [f for f in Path("p").rglob("*") if f.is_file() and "index" in f.parts]  # nothing half-written
    assert "index/bm25" not in (Path("p/manifest.json").read_text())
    monkeypatch.setenv("GLOSS_DEBUG", "1")  # the traceback on request
    with pytest.raises(ModuleNotFoundError):
        runner.invoke(app, ["index", "--retriever", "bm25", "-p", "p"], catch_exceptions=False)


def test_the_run_extra_is_what_the_main_job_imports() -> None:
    """The README's main command installs '.[run]': train + bm25 + plot + ct2 (a prebuilt wheel), and none of the
    dense or llama extras."""
    import tomllib

    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert extras["run"] == ["gloss[train,bm25,plot,ct2]"] and extras["ct2"] == ["ctranslate2>=4.5"]
    readme = (REPO / "README.md").read_text()
    main = readme.split("<!-- main-command -->")[1].split("<!-- /main-command -->")[0]
    assert "-e '.[run]'" in main and "llama" not in main
