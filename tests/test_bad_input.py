"""Every bad input: one error line + a hint, exit 1, no traceback, nothing written (issue 26: never a wrong number with
exit 0).

One table row per case: how the world is broken, the command, and what the first line of stderr says. Each row starts
from a copy of one prepared world: a compact-format source folder (src/), a project with data and a BM25 index (proj/),
a good GLoSS queries file (q.json) and a good 'gloss generate' queries file (queries.jsonl).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from typer.testing import CliRunner

from gloss_cli.cli import app
from tests.conftest import synthetic_rows, write_gz_csv

runner = CliRunner()
# The Last-Item-Search baseline under the paper's protocol on every user of the split (no generate stage needed)
LIS_ALL = ["--recipe", "lis-paper users=all"]
Setup = Callable[[pytest.MonkeyPatch], None]


# -- the prepared world ---------------------------------------------------------------------------------------
def _gloss_rows(project: Path) -> list[dict[str, Any]]:
    """A GLoSS queries file for the test split: the target's title first (a perfect model), then history titles."""
    titles = dict(pl.read_parquet(project / "data/items.parquet").iter_rows())
    rows = []
    for r in pl.read_parquet(project / "data/test.parquet").iter_rows(named=True):
        queries = [titles[r["target"]], *(titles[h] for h in reversed(r["history"]))][:5]
        queries += ["no such thing"] * (5 - len(queries))
        rows.append(
            {
                "reviewer_id": r["user_id"],
                "asin": r["target"],
                "seen_asins": r["history"],
                "generated_sequences": [f"Title: {q}" for q in queries],
            }
        )
    return rows


def _as_jsonl(rows: list[dict[str, Any]]) -> str:
    lines = []
    for r in rows:
        queries = [q.removeprefix("Title: ") for q in r["generated_sequences"]]
        entry = {"user_id": r["reviewer_id"], "target": r["asin"], "history": r["seen_asins"], "queries": queries}
        lines.append(json.dumps(entry | {"scores": [-1.0] * len(queries)}))
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("world")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GLOSS_HOME", str(root / "home"))
        for var in ("GLOSS_PROJECT", "GLOSS_DATA_DIR", "GLOSS_DEBUG"):
            mp.delenv(var, raising=False)
        mp.chdir(root)
        inter, items = synthetic_rows()
        write_gz_csv(root / "src/interactions.csv.gz", ["user_id", "item_id", "timestamp"], inter)
        write_gz_csv(root / "src/items.csv.gz", ["item_id", "title"], items)
        for args in (["data", "--source", "src", "-p", "proj", "-q"], ["index", "-p", "proj", "-q"]):
            result = runner.invoke(app, args)
            assert result.exit_code == 0, result.output
        rows = _gloss_rows(root / "proj")
        (root / "q.json").write_text(json.dumps(rows))
        (root / "queries.jsonl").write_text(_as_jsonl(rows))
    return root


@pytest.fixture
def world(template: Path, tmp_path: Path) -> Path:
    """A fresh copy of the prepared world in the test's working folder."""
    for name in ("src", "proj", "q.json", "queries.jsonl"):
        source = template / name
        if source.is_dir():
            shutil.copytree(source, tmp_path / name)
        else:
            shutil.copy2(source, tmp_path / name)
    return tmp_path


def _snapshot(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


# -- ways to break it -----------------------------------------------------------------------------------------
def _lines(name: str) -> list[str]:
    return gzip.decompress(Path("src", name).read_bytes()).decode().splitlines()


def _write_lines(name: str, lines: list[str]) -> None:
    Path("src", name).write_bytes(gzip.compress(("\n".join(lines) + "\n").encode()))


def _set_line(name: str, index: int, text: str) -> Setup:
    def setup(_: pytest.MonkeyPatch) -> None:
        lines = _lines(name)
        lines[index] = text
        _write_lines(name, lines)

    return setup


def _truncate(_: pytest.MonkeyPatch) -> None:
    data = Path("src/interactions.csv.gz").read_bytes()
    Path("src/interactions.csv.gz").write_bytes(data[: len(data) // 2])


def _header_only(name: str) -> Setup:
    return lambda _: _write_lines(name, _lines(name)[:1])


def _no_titles(_: pytest.MonkeyPatch) -> None:
    _write_lines("items.csv.gz", ["item_id,title", *(f"{line.split(',')[0]}," for line in _lines("items.csv.gz")[1:])])


def _other_items(_: pytest.MonkeyPatch) -> None:
    write_gz_csv(Path("src/items.csv.gz"), ["item_id", "title"], [["X1", "a thing"], ["X2", "another thing"]])


def _not_utf8(_: pytest.MonkeyPatch) -> None:
    lines = gzip.decompress(Path("src/items.csv.gz").read_bytes()).split(b"\n")
    lines[3] = b"I777,Caf\xe9 cr\xe8me"  # latin-1 bytes
    Path("src/items.csv.gz").write_bytes(gzip.compress(b"\n".join(lines)))


def _gloss_json(mutate: Callable[[list[dict[str, Any]]], Any]) -> Setup:
    """bad.json: the good GLoSS file's entries, mutated (a str result is written as it is)."""

    def setup(_: pytest.MonkeyPatch) -> None:
        bad = mutate(json.loads(Path("q.json").read_text()))
        Path("bad.json").write_text(bad if isinstance(bad, str) else json.dumps(bad))

    return setup


def _jsonl(mutate: Callable[[list[str]], list[str]]) -> Setup:
    """bad.jsonl: the good queries.jsonl's lines, mutated."""

    def setup(_: pytest.MonkeyPatch) -> None:
        Path("bad.jsonl").write_text("\n".join(mutate(Path("queries.jsonl").read_text().splitlines())) + "\n")

    return setup


def _first(rows: list[dict[str, Any]], **changes: Any) -> list[dict[str, Any]]:
    return [rows[0] | changes, *rows[1:]]


def _other_history(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    catalog = {item for r in rows for item in [r["asin"], *r["seen_asins"]]}
    other = next(item for item in sorted(catalog) if item not in rows[0]["seen_asins"])
    return _first(rows, seen_asins=[*rows[0]["seen_asins"][:-1], other])


def _other_target(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return _first(rows, asin=next(r["asin"] for r in rows if r["asin"] != rows[0]["asin"]))


def _jsonl_field(**changes: Any) -> Callable[[list[str]], list[str]]:
    return lambda lines: [json.dumps(json.loads(lines[0]) | changes), *lines[1:]]


def _little_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("gloss_cli.limits.available_memory", lambda: 1000)


def _nan_lr(_: pytest.MonkeyPatch) -> None:
    Path("train.toml").write_text("[train]\nlr = nan\n")


def _index_file_changed(_: pytest.MonkeyPatch) -> None:
    target = next(p for p in sorted(Path("proj/index/bm25").iterdir()) if p.name != "meta.json")
    target.write_bytes(target.read_bytes() + b" ")


def _split_deleted(_: pytest.MonkeyPatch) -> None:
    Path("proj/data/test.parquet").unlink()


def _eval_files_deleted(_: pytest.MonkeyPatch) -> None:
    assert runner.invoke(app, ["eval", *LIS_ALL, "-p", "proj", "-q"]).exit_code == 0
    Path("proj/eval/lis-top1-kept-allusers-bm25-test/per_user.parquet").unlink()


def _schema_zero(_: pytest.MonkeyPatch) -> None:
    manifest = Path("proj/manifest.json")
    manifest.write_text(json.dumps(json.loads(manifest.read_text()) | {"schema_version": 0}))


def _a_file(_: pytest.MonkeyPatch) -> None:
    Path("afile").write_text("not a project\n")


# -- the table ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    setup: Setup | None
    args: list[str]
    message: str  # in stderr's first line, after "error: "


DATA = ["data", "--source", "src", "-p", "proj", "-q"]
# the paper's recipe reads the file's 5 queries per user
EVAL_JSON = ["eval", "--recipe", "paper", "--queries", "bad.json", "-p", "proj", "-q"]
EVAL_JSONL = ["eval", "--recipe", "paper", "--queries", "bad.jsonl", "-p", "proj", "-q"]
EVAL = ["eval", "-p", "proj"]
INTER, ITEMS = "interactions.csv.gz", "items.csv.gz"

CASES: dict[str, Case] = {
    # compact CSV pair (gloss data)
    "truncated gz": Case(_truncate, DATA, "not a complete gzip file"),
    "malformed line": Case(
        _set_line(INTER, 4, "U001,I001,12,extra,fields"), DATA, f"{INTER}, line 5: expected 3 fields"
    ),
    "timestamp not an integer": Case(
        _set_line(INTER, 6, "U001,I001,yesterday"), DATA, "line 7: timestamp 'yesterday' is not an integer"
    ),
    "timestamp past int64": Case(
        _set_line(INTER, 6, "U001,I001,99999999999999999999"), DATA, "is not an integer of 64 bits"
    ),
    "timestamp in Arabic digits": Case(_set_line(INTER, 6, "U001,I001,١٢٣"), DATA, "timestamp '١٢٣' is not an integer"),
    "timestamp a decimal": Case(
        _set_line(INTER, 2, "U001,I001,1.5"), DATA, "line 3: timestamp '1.5' is not an integer"
    ),
    "empty user_id": Case(_set_line(INTER, 3, ",I001,1400000000"), DATA, f"{INTER}, line 4: empty user_id"),
    "item_id with spaces": Case(
        _set_line(INTER, 3, "U001, I001,1400000000"), DATA, "item_id ' I001' has leading or trailing spaces"
    ),
    "missing column": Case(_set_line(INTER, 0, "user_id,item_id,time"), DATA, "lacks column(s) timestamp"),
    "empty file": Case(lambda _: Path("src", ITEMS).write_bytes(gzip.compress(b"")), DATA, f"{ITEMS} is empty"),
    "non-utf8": Case(_not_utf8, DATA, f"{ITEMS}, line 4: bytes that are not UTF-8"),
    "10,000-word title": Case(
        _set_line(ITEMS, 2, "I001," + " ".join(["word"] * 10_000)), DATA, "title of 10,000 words"
    ),
    "items: header only": Case(_header_only(ITEMS), DATA, f"{ITEMS} has a header but no rows"),
    "interactions: header only": Case(_header_only(INTER), DATA, f"{INTER} has a header but no rows"),
    "items: every title empty": Case(_no_titles, DATA, "no item has a title"),
    "items of another catalog": Case(_other_items, DATA, "No user has 3 or more interactions with titled items"),
    "source without data": Case(
        lambda _: Path("empty").mkdir(), ["data", "--source", "empty", "-p", "proj"], "holds no beauty data"
    ),
    "unknown dataset": Case(None, ["data", "--dataset", "garden", "-p", "proj"], "Unknown dataset 'garden'"),
    "unknown --train-examples": Case(None, [*DATA, "--train-examples", "some"], "Unknown --train-examples 'some'"),
    # GLoSS queries JSON (gloss eval --queries)
    "json: not JSON": Case(_gloss_json(lambda rows: "{broken"), EVAL_JSON, "is not JSON"),
    "json: an object": Case(_gloss_json(lambda rows: rows[0]), EVAL_JSON, "is not a non-empty JSON list"),
    "json: empty list": Case(_gloss_json(lambda rows: []), EVAL_JSON, "is not a non-empty JSON list"),
    "json: entry a number": Case(_gloss_json(lambda rows: [7, *rows]), EVAL_JSON, "entry 1: a number, not an object"),
    "json: missing field": Case(
        _gloss_json(lambda rows: [{k: v for k, v in rows[0].items() if k != "seen_asins"}]),
        EVAL_JSON,
        "no field seen_asins",
    ),
    "json: generated_sequences a string": Case(
        _gloss_json(lambda rows: _first(rows, generated_sequences="abcde")),
        EVAL_JSON,
        "generated_sequences: Input should be a valid list (got a string)",
    ),
    "json: a sequence a number": Case(
        _gloss_json(lambda rows: _first(rows, generated_sequences=["Title: a", "b", 3, "c", "d"])),
        EVAL_JSON,
        "generated_sequences[2]: Input should be a valid string (got a number)",
    ),
    "json: reviewer_id a list": Case(
        _gloss_json(lambda rows: _first(rows, reviewer_id=["U1"])),
        EVAL_JSON,
        "entry 1: reviewer_id: Input should be a valid string (got a list)",
    ),
    "json: seen_asins null": Case(
        _gloss_json(lambda rows: _first(rows, seen_asins=None)),
        EVAL_JSON,
        "seen_asins: Input should be a valid list (got null)",
    ),
    "json: asin empty": Case(
        _gloss_json(lambda rows: _first(rows, asin="")), EVAL_JSON, "asin: String should have at least 1 character"
    ),
    "json: unknown user": Case(_gloss_json(lambda rows: _first(rows, reviewer_id="NOBODY")), EVAL_JSON, "unknown user"),
    "json: a user id like rich markup": Case(
        _gloss_json(lambda rows: _first(rows, reviewer_id="[/x]")), EVAL_JSON, "entry 1 (user [/x]): unknown user"
    ),
    "json: unknown item in history": Case(
        _gloss_json(lambda rows: _first(rows, seen_asins=["B0NOTREAL"])), EVAL_JSON, "unknown item B0NOTREAL"
    ),
    "json: asin edited to an unknown id": Case(
        _gloss_json(lambda rows: _first(rows, asin="B0NOTREAL")), EVAL_JSON, "unknown item B0NOTREAL"
    ),
    "json: asin of another user": Case(_gloss_json(_other_target), EVAL_JSON, "differs from the split's"),
    "json: history not the split's": Case(_gloss_json(_other_history), EVAL_JSON, "the history of 1 of"),
    "json: three sequences": Case(
        _gloss_json(lambda rows: _first(rows, generated_sequences=rows[0]["generated_sequences"][:3])),
        EVAL_JSON,
        "3 generated sequences, expected 5",
    ),
    "json: a user twice, differently": Case(
        _gloss_json(lambda rows: [*rows, rows[0] | {"generated_sequences": ["Title: x"] * 5}]),
        EVAL_JSON,
        "a second, different entry for this user",
    ),
    "json: no such file": Case(None, ["eval", "--queries", "none.json", "-p", "proj"], "does not exist"),
    # gloss generate's queries.jsonl (gloss eval --queries)
    "jsonl: a folder": Case(
        lambda _: Path("dir.jsonl").mkdir(), ["eval", "--queries", "dir.jsonl", "-p", "proj"], "dir.jsonl is a folder"
    ),
    "jsonl: a line not JSON": Case(
        _jsonl(lambda lines: [lines[0], "{oops", *lines[1:]]), EVAL_JSONL, "line 2: not JSON"
    ),
    "jsonl: a line a list": Case(_jsonl(lambda lines: ["[1, 2]", *lines]), EVAL_JSONL, "line 1: a list, not an object"),
    "jsonl: queries a string": Case(
        _jsonl(_jsonl_field(queries="abcde")), EVAL_JSONL, "queries: Input should be a valid list (got a string)"
    ),
    "jsonl: user_id a number": Case(
        _jsonl(_jsonl_field(user_id=12)), EVAL_JSONL, "line 1: user_id: Input should be a valid string (got a number)"
    ),
    "jsonl: history null": Case(
        _jsonl(_jsonl_field(history=None)), EVAL_JSONL, "history: Input should be a valid list (got null)"
    ),
    "jsonl: no target": Case(
        _jsonl(lambda lines: [json.dumps({k: v for k, v in json.loads(lines[0]).items() if k != "target"})]),
        EVAL_JSONL,
        "no field target",
    ),
    "jsonl users: user_id a list": Case(
        _jsonl(_jsonl_field(user_id=["U000"])),
        ["eval", "--recipe", "lis-paper", "--queries", "bad.jsonl", "-p", "proj", "-q"],
        "Cannot read the users of",
    ),
    "jsonl users: user_id null": Case(
        _jsonl(_jsonl_field(user_id=None)),
        ["eval", "--recipe", "lis-paper", "--queries", "bad.jsonl", "-p", "proj", "-q"],
        "user_id: Input should be a valid string (got null)",
    ),
    # numeric bounds, checked before any work
    "recipe queries=0": Case(
        None, [*EVAL, "--queries", "q.json", "--recipe", "paper queries=0"], "lists has model but queries is below 1"
    ),
    "recipe queries=-1": Case(
        None, [*EVAL, "--queries", "q.json", "--recipe", "paper queries=-1"], "lists has model but queries is below 1"
    ),
    "recipe queries=two": Case(
        None, [*EVAL, "--queries", "q.json", "--recipe", "paper queries=two"], "queries=two is not a whole number"
    ),
    "-k 0": Case(None, [*EVAL, *LIS_ALL, "-k", "0"], "Invalid value for '--k' / '-k'"),
    "-k past the catalog": Case(None, [*EVAL, *LIS_ALL, "-k", "100000"], "-k 100,000 is more than the catalog's"),
    "eval that would not fit in memory": Case(
        _little_memory, [*EVAL, *LIS_ALL, "-k", "20"], "of memory; 1,000 B is available"
    ),
    "train --lr 0": Case(None, ["train", "--lr", "0", "-p", "proj"], "Invalid value for '--lr': 0.0 is not greater"),
    "train --epochs 0": Case(None, ["train", "--epochs", "0", "-p", "proj"], "Invalid value for '--epochs'"),
    "train --batch-size -3": Case(None, ["train", "--batch-size", "-3", "-p", "proj"], "'--batch-size'"),
    "train --max-minutes -1": Case(None, ["train", "--max-minutes", "-1", "-p", "proj"], "'--max-minutes'"),
    "train --stop-at-step -2": Case(None, ["train", "--stop-at-step", "-2", "-p", "proj"], "'--stop-at-step'"),
    "train config: lr nan": Case(_nan_lr, ["train", "--config", "train.toml", "-p", "proj"], "lr must be a finite"),
    "a split deleted": Case(_split_deleted, [*EVAL, *LIS_ALL], "data/test.parquet is missing"),
    "segments after an eval's files were deleted": Case(
        _eval_files_deleted, ["segments", "-p", "proj"], "per_user.parquet is missing since stage 'eval/"
    ),
    "a manifest with schema_version 0": Case(
        _schema_zero, [*EVAL, *LIS_ALL], "has schema 0, which no gloss version wrote"
    ),
    "--project naming a file": Case(_a_file, ["eval", *LIS_ALL, "-p", "afile"], "is a file, not a project"),
    "an index file changed on disk": Case(_index_file_changed, [*EVAL, *LIS_ALL], "changed since stage 'index/bm25'"),
    "generate --beams 0": Case(None, ["generate", "--beams", "0", "-p", "proj"], "Invalid value for '--beams'"),
    "rerank candidates=0": Case(
        None, ["rerank", "--recipe", "rerank candidates=0", "-p", "proj"], "Recipe: candidates=0 is below 1"
    ),
    "rerank candidates past the catalog": Case(
        None,
        ["rerank", "--recipe", "rerank candidates=5000", "-p", "proj"],
        "candidates=5,000 is more than the catalog's 37 items",
    ),
    "rerank that would not fit in memory": Case(
        _little_memory, ["rerank", "--split", "test", "-p", "proj"], "users x 3 queries needs about"
    ),
    "recommend -k 0": Case(None, ["recommend", "--user", "U001", "-k", "0", "-p", "proj"], "Invalid value for '--k'"),
    "recommend -k past the catalog": Case(
        None, ["recommend", "--user", "U001", "-k", "5000", "-p", "proj"], "is more than the catalog's"
    ),
    "segments -k 0": Case(None, ["segments", "-k", "0", "-p", "proj"], "Invalid value for '--k' / '-k'"),
    "train --max-minutes with --schedule-steps": Case(
        None,
        ["train", "--max-minutes", "1", "--schedule-steps", "5", "-p", "proj"],
        "--schedule-steps replays a --max-minutes run",
    ),
    # a recipe that cannot be computed (issue 20): one line before any work
    "recipe: empty": Case(None, [*EVAL, "--recipe", " "], "The recipe is empty"),
    "recipe: unknown preset": Case(None, [*EVAL, "--recipe", "magic"], "Unknown recipe 'magic'"),
    "recipe: unknown key": Case(None, [*EVAL, "--recipe", "gloss beams=3"], "Recipe: cannot read 'beams=3'"),
    "recipe: a key without a value": Case(None, [*EVAL, "--recipe", "lis seen="], "Recipe: cannot read 'seen='"),
    "recipe: a key twice": Case(None, [*EVAL, "--recipe", "seen=kept seen=excluded"], "Recipe: seen is given twice"),
    "recipe: bad value": Case(None, [*EVAL, "--recipe", "lis seen=never"], "Recipe: seen=never is unknown"),
    "recipe: unknown list": Case(None, [*EVAL, "--recipe", "lists=lis,popular"], "is not a list of distinct"),
    "recipe: a list twice": Case(None, [*EVAL, "--recipe", "lists=lis,lis"], "is not a list of distinct"),
    "recipe: lists out of order": Case(
        None, [*EVAL, "--recipe", "lists=model,lis"], "lists=model,lis: lists are fused in the order"
    ),
    "recipe: merge=top1 with transitions": Case(
        None, [*EVAL, "--recipe", "no-model merge=top1"], "the transitions list is ranked, not a query"
    ),
    "recipe: order=fused with merge=top1": Case(
        None, [*EVAL, "--recipe", "paper order=fused"], "order=fused reorders a pool filled to its depth"
    ),
    "recipe: users=all with model": Case(
        None, [*EVAL, "--recipe", "model users=all"], "users=all with the model's queries"
    ),
    "recipe: queries without model": Case(
        None, [*EVAL, "--recipe", "lis queries=3"], "queries=3 but lists has no model"
    ),
    "recipe: candidates=0": Case(None, [*EVAL, "--recipe", "rerank-lm candidates=0"], "candidates=0 is below 1"),
    "recommend: a bad recipe": Case(
        None, ["recommend", "--user", "U001", "--recipe", "paper users=all", "-p", "proj"], "users=all with the model"
    ),
    # a flag the recipe would not read (issue 20): refused, never ignored
    "eval: a queries file with users=all": Case(
        None,
        [*EVAL, "--recipe", "lis users=all", "--queries", "/nonexistent.json"],
        "--queries gives the model's queries, or the users to score: recipe lis-rrf-xseen-allusers reads neither",
    ),
    "eval: a GLoSS JSON file with a no-model recipe": Case(
        None,
        [*EVAL, "--recipe", "lis", "--queries", "q.json"],
        "Recipe lis reads no queries, and a GLoSS JSON file gives no users of its own here",
    ),
    "eval: --retriever with the transitions recipe": Case(
        None,
        [*EVAL, "--recipe", "transitions", "--retriever", "e5"],
        "--retriever does not apply to recipe transitions",
    ),
    "eval: --encoder with the transitions recipe": Case(
        None, [*EVAL, "--recipe", "transitions users=all", "--encoder", "mpnet"], "--encoder does not apply to recipe"
    ),
    # the SASRec anchor (gloss sasrec, issue 22)
    "eval: a sasrec recipe before gloss sasrec": Case(
        None, [*EVAL, "--recipe", "sasrec"], "No SASRec model in this project."
    ),
    "eval: --retriever with the sasrec recipe": Case(
        None, [*EVAL, "--recipe", "sasrec", "--retriever", "e5"], "--retriever does not apply to recipe sasrec"
    ),
    "eval: --encoder with sasrec and transitions": Case(
        None,
        [*EVAL, "--recipe", "lists=sasrec,transitions users=all", "--encoder", "mpnet"],
        "--encoder does not apply to recipe sasrec+transitions-rrf-xseen-allusers",
    ),
    "recipe: merge=top1 with sasrec": Case(
        None, [*EVAL, "--recipe", "sasrec merge=top1"], "the sasrec list is ranked, not a query"
    ),
    "recipe: sasrec after transitions": Case(
        None, [*EVAL, "--recipe", "lists=transitions,sasrec"], "lists are fused in the order sasrec, transitions"
    ),
    "recommend: a sasrec recipe before gloss sasrec": Case(
        None,
        ["recommend", "--user", "U001", "--recipe", "lists=sasrec,transitions", "-p", "proj"],
        "No SASRec model in this project.",
    ),
    "sasrec: heads that do not divide the hidden size": Case(
        None, ["sasrec", "--hidden", "6", "--heads", "4", "-p", "proj"], "--heads 4 does not divide --hidden 6"
    ),
    "sasrec: an unknown loss": Case(None, ["sasrec", "--loss", "hinge", "-p", "proj"], "Unknown --loss 'hinge'"),
    "sasrec: a learning rate of 0": Case(None, ["sasrec", "--lr", "0", "-p", "proj"], "--lr 0.0 is not above 0"),
    "eval: --encoder with a rerank recipe": Case(
        None, [*EVAL, "--recipe", "rerank", "--encoder", "mpnet"], "--encoder does not apply to recipe rerank"
    ),
    "eval: --queries with a rerank recipe": Case(
        None, [*EVAL, "--recipe", "rerank-lm", "--queries", "q.json"], "--queries does not apply to recipe rerank-lm"
    ),
    "rerank: a recipe with nothing to score": Case(
        None, ["rerank", "--recipe", "gloss", "-p", "proj"], "Recipe gloss keeps the retrieval order"
    ),
    "recommend: a rerank recipe": Case(
        None,
        ["recommend", "--user", "U001", "--recipe", "rerank", "-p", "proj"],
        "gloss recommend ranks in retrieval order; recipe rerank reorders scored pools",
    ),
    "recommend: --backend with a no-model recipe": Case(
        None,
        ["recommend", "--user", "U001", "--recipe", "no-model", "--backend", "hf", "-p", "proj"],
        "--backend does not apply to recipe no-model: it generates nothing",
    ),
    # click's usage errors, in gloss's form
    "unknown option": Case(None, ["eval", "--frobnicate", "-p", "proj"], "No such option: --frobnicate"),
    "unknown command": Case(None, ["frobnicate", "-p", "proj"], "No such command 'frobnicate'"),
    "option without its value": Case(None, ["eval", "-p", "proj", "--split"], "Option '--split' requires an argument"),
    "not an integer": Case(None, ["eval", "-k", "abc", "-p", "proj"], "Invalid value for '--k' / '-k'"),
    "extra argument": Case(None, ["status", "extra", "-p", "proj"], "unexpected extra argument"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input(case: str, world: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    row = CASES[case]
    if row.setup is not None:
        row.setup(monkeypatch)
    before = _snapshot(world / "proj")
    result = runner.invoke(app, row.args)
    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    lines = result.stderr.splitlines()
    assert lines[0].startswith("error: ") and row.message in lines[0], lines
    assert lines[1].startswith("hint: "), lines
    assert sum(line.startswith("error: ") for line in lines) == 1 and "Traceback" not in result.output
    assert _snapshot(world / "proj") == before  # no partial output
    assert not list((world / "proj").glob(".gloss.lock")) and not list((world / "proj").rglob(".tmp-*"))


def test_the_table_covers_every_format() -> None:
    assert len(CASES) >= 25
    assert {c.args[0] for c in CASES.values()} >= {"data", "eval", "train", "generate", "rerank", "recommend", "sasrec"}


def test_usage_errors_hint_at_the_command_help(world: Path) -> None:
    for args, hint in (
        (["eval", "--frobnicate"], "hint: Run 'gloss eval --help'."),
        (["eval", "--split"], "hint: Run 'gloss eval --help'."),
        (["--frobnicate"], "hint: Run 'gloss --help'."),
    ):
        result = runner.invoke(app, args)
        assert result.exit_code == 1 and result.stderr.splitlines()[1] == hint, result.stderr


def test_a_byte_order_mark_is_accepted(world: Path) -> None:
    clean = runner.invoke(app, ["data", "--source", "src", "-p", "clean", "--json", "-q"])
    for name in (INTER, ITEMS):
        data = gzip.decompress((world / "src" / name).read_bytes())
        (world / "src" / name).write_bytes(gzip.compress(b"\xef\xbb\xbf" + data))
    with_bom = runner.invoke(app, ["data", "--source", "src", "-p", "bom", "--json", "-q"])
    assert clean.exit_code == with_bom.exit_code == 0, with_bom.output
    assert json.loads(clean.stdout)["stats"] == json.loads(with_bom.stdout)["stats"]
    for name in ("items", "test", "train", "validation"):
        assert pl.read_parquet(f"clean/data/{name}.parquet").equals(pl.read_parquet(f"bom/data/{name}.parquet"))


def test_queries_files_with_as_many_users_never_share_a_run(world: Path) -> None:
    rows = json.loads((world / "q.json").read_text())
    (world / "other.json").write_text(json.dumps([r | {"generated_sequences": ["Title: x"] * 5} for r in rows]))
    runs = []
    for path in ("q.json", "other.json"):
        result = runner.invoke(app, ["eval", "--queries", path, "-p", "proj", "--json", "-q"])
        assert result.exit_code == 0, result.output
        runs.append(json.loads(result.stdout))
    assert runs[0]["run"] != runs[1]["run"] and runs[0]["metrics"] != runs[1]["metrics"]
    for doc in runs:  # each run's files are its own: the second did not overwrite the first
        metrics = json.loads(Path(doc["folder"], "metrics.json").read_text())["metrics"]
        assert metrics == doc["metrics"]


def test_exact_repeats_and_unknown_fields_change_nothing(world: Path) -> None:
    rows = json.loads((world / "q.json").read_text())
    (world / "same.json").write_text(json.dumps([*(r | {"note": "extra"} for r in rows), rows[0]]))
    docs = []
    for path in ("q.json", "same.json"):
        result = runner.invoke(app, ["eval", "--queries", path, "-p", "proj", "--json", "-q"])
        assert result.exit_code == 0, result.output
        docs.append(json.loads(result.stdout))
    assert docs[0]["metrics"] == docs[1]["metrics"] and docs[0]["users"] == docs[1]["users"]


def test_corrupt_manifest_is_reported_not_overwritten(world: Path) -> None:
    Path("proj/manifest.json").write_text("{not json")
    result = runner.invoke(app, DATA)
    assert result.exit_code == 1 and "is not valid JSON" in result.stderr
    assert Path("proj/manifest.json").read_text() == "{not json"


def test_debug_env_shows_the_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GLOSS_DEBUG", "1")
    result = runner.invoke(app, ["data", "--dataset", "garden"])
    assert result.exit_code != 0 and type(result.exception).__name__ == "GlossError"


def test_newer_manifest_schema_is_refused(world: Path) -> None:
    doc = json.loads(Path("proj/manifest.json").read_text())
    doc["schema_version"] = 99
    Path("proj/manifest.json").write_text(json.dumps(doc))
    result = runner.invoke(app, ["status", "-p", "proj"])
    assert result.exit_code == 1 and "schema 99" in result.stderr and "pip install -U" in result.stderr
