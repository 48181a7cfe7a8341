"""The manifest records the exact command line of every stage, and running that line again makes the same stage.

Each command runs with options off their defaults in one copy of a small project (data + a tiny trained model + one
eval run); its recorded invocation then runs in a second copy, and both records must have the same params.
"""

from __future__ import annotations

import json
import shlex
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from gloss_cli.cli import app
from gloss_cli.project import Project
from tests.conftest import synthetic_rows, write_gz_csv
from tests.tiny_model import build_tiny_llama

runner = CliRunner()


def _ok(args: list[str]) -> None:
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(project, source folder, tiny model): data, train and eval/base-lis done."""
    root = tmp_path_factory.mktemp("base")
    inter, items = synthetic_rows()
    source = root / "src" / "beauty"
    write_gz_csv(source / "interactions.csv.gz", ["user_id", "item_id", "timestamp"], inter)
    write_gz_csv(source / "items.csv.gz", ["item_id", "title"], items)
    tiny = build_tiny_llama(root / "llama")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GLOSS_HOME", str(root / "home"))
        mp.delenv("GLOSS_PROJECT", raising=False)
        project = root / "p"
        _ok(["data", "--source", str(source), "-p", str(project), "-q"])
        args = ["train", "--model", str(tiny), "--epochs", "1", "--max-steps", "1", "--batch-size", "4"]
        _ok([*args, "-p", str(project), "-q"])
        args = ["eval", "--recipe", "lis-paper users=all", "-k", "5", "-k", "10", "--name", "base-lis"]
        _ok([*args, "-p", str(project), "-q"])
    return project, source, tiny


# (the command's arguments, off their defaults and some by their short names, as a shell reads them; the stage it
# records)
CASES = [
    ("data --source {source} --dedup --train-examples all-prefixes -d beauty", "data"),
    ("train -m {tiny} --epochs 1 --max-steps 1 --batch-size 2 --lr 0.001 --seed 3 --loss completion", "train"),
    (
        "generate -s validation --limit 2 --beams 2 --num-return 2 --max-new-tokens 6 --batch-size 2 --dtype fp32",
        "generate/validation",
    ),
    ("index -r bm25", "index/bm25"),
    ("eval -R 'lis users=all' -k 10 -k 5 --name mine --split validation", "eval/mine"),
    (
        "rerank -s validation --recipe 'lists=lis order=fused candidates=5 users=all' --batch-size 2",
        "rerank/validation-lis-rrf-xseen-allusers-5-bm25",
    ),
    ("segments --run base-lis -k 10 --cold 4 --power 9", "segments"),
]


@pytest.mark.parametrize(("line", "stage"), CASES, ids=[line.split()[0] for line, _ in CASES])
def test_the_recorded_invocation_remakes_the_stage(base: tuple[Path, Path, Path], line: str, stage: str) -> None:
    project, source, tiny = base
    shutil.copytree(project, "a")
    shutil.copytree(project, "b")
    args = shlex.split(line.format(source=source, tiny=tiny))
    _ok([*args, "-p", "a", "-q", "--json"])
    first = Project("a").stage(stage)
    assert first is not None
    words = shlex.split(first["invocation"])
    assert words[:2] == ["gloss", args[0]]
    # every option given is there by its long name; --project and output options are not
    assert {w for w in args if w.startswith("--")} <= set(words)
    assert not {"-p", "--project", "-q", "--quiet", "--json"} & set(words)
    _ok([*words[1:], "-p", "b", "-q"])
    again = Project("b").stage(stage)
    assert again is not None and again["finished"] >= first["finished"]
    assert again["params"] == first["params"] and again["invocation"] == first["invocation"]
    status = json.loads(runner.invoke(app, ["status", "-p", "a", "--json"]).stdout)
    assert {s["name"]: s["command"] for s in status["stages"]}[stage] == first["invocation"]


def test_eval_records_every_option_in_declaration_order(base: tuple[Path, Path, Path]) -> None:
    shutil.copytree(base[0], "p")
    _ok(["eval", "--name", "mine", "--recipe", "lis users=all", "-k", "10", "-p", "p"])
    record = Project("p").stage("eval/mine")
    assert record is not None
    assert record["invocation"] == "gloss eval --k 10 --recipe 'lis users=all' --name mine"
    Path("p/eval/mine/metrics.json").write_text("{}")
    status = json.loads(runner.invoke(app, ["status", "-p", "p", "--json"]).stdout)
    row = next(s for s in status["stages"] if s["name"] == "eval/mine")
    assert row["state"] == "modified" and row["command"] == record["invocation"]
    assert Project("p").redo_command("eval/mine", record) == record["invocation"] + " --project p"


def test_a_stage_built_on_the_way_keeps_its_own_command(base: tuple[Path, Path, Path]) -> None:
    """eval builds a missing index; the index's redo command is gloss index, not the eval line."""
    shutil.copytree(base[0], "p")
    shutil.rmtree("p/index")
    _ok(["eval", "--recipe", "lis-paper users=all", "--name", "again", "-p", "p", "-q"])
    record = Project("p").stage("index/bm25")
    assert record and "invocation" not in record and record["command"] == "gloss index --retriever bm25"


def test_gloss_run_records_itself_for_each_stage(
    base: tuple[Path, Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`gloss run` redoes whichever of its stages is not done, so its line is each stage's invocation."""
    _, source, tiny = base
    monkeypatch.setenv("GLOSS_DATA_DIR", str(source.parent))
    # options in their declared order, as the recorded line has them
    args = ["run", "--limit-users", "10", "--eval-users", "4", "--max-seq-len", "1024", "--model", str(tiny)]
    args += ["--backend", "hf"]
    _ok([*args, "-p", "a", "-q", "--json"])
    first = Project("a").manifest()["stages"]
    assert {record["invocation"] for record in first.values()} == {shlex.join(["gloss", *args])}
    _ok([*shlex.split(next(iter(first.values()))["invocation"])[1:], "-p", "b", "-q", "--json"])
    again = Project("b").manifest()["stages"]
    assert again.keys() == first.keys()
    assert all(again[name]["params"] == first[name]["params"] for name in first)
