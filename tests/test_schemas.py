"""Property: whatever malformed value a user's file holds, gloss never shows a traceback, and never exits 0 with a
result that differs from the clean file's (issue 26: never a wrong number with exit 0).

Each format a user may hand gloss gets malformed values (wrong types, nulls, empty strings, unicode, huge numbers,
missing fields, broken lines) and harmless changes (unknown fields, exact repeats, a byte-order mark). Exit 1 must come
with one ``error:`` line; exit 0 must give the clean file's metrics (or tables).

GLOSS_FUZZ_EXAMPLES=500 explores more, with a random seed; by default a fixed seed keeps CI reproducible.
"""

from __future__ import annotations

import csv
import gzip
import io
import itertools
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner, Result

from gloss_cli.cli import app
from gloss_cli.queries import GENERATED_FIELDS, GLOSS_FIELDS
from tests.conftest import synthetic_rows
from tests.test_bad_input import _as_jsonl, _gloss_rows

runner = CliRunner()
EXAMPLES = int(os.environ.get("GLOSS_FUZZ_EXAMPLES", "30"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize="GLOSS_FUZZ_EXAMPLES" not in os.environ,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
_counter = itertools.count()

# -- malformed values ---------------------------------------------------------------------------------------------
TEXT = st.text(max_size=12) | st.sampled_from(["", " ", "\ufeff", "[/x]", "Title: ü", "\ud800", "١٢٣", "null", "1e309"])
NUMBERS = st.integers(-(2**70), 2**70) | st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from([0, -1])
SCALARS = st.none() | st.booleans() | NUMBERS | TEXT
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=8,
)


def _valid_queries(value: Any) -> bool:
    """A list of at least 5 strings is a valid set of generated titles (different ones, so another result)."""
    return isinstance(value, list) and len(value) >= 5 and all(isinstance(q, str) for q in value)


def _check(result: Result, clean: dict[str, Any]) -> None:
    """The property itself."""
    assert result.exit_code in (0, 1), (result.exit_code, result.output, result.exception)
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    if result.exit_code == 1:
        lines = result.stderr.splitlines()
        assert sum(line.startswith("error: ") for line in lines) == 1, result.stderr
        assert lines[-1].startswith("hint: ") and "Traceback" not in result.output, result.stderr
        return
    doc = json.loads(result.stdout)
    assert (doc["users"], doc["metrics"]) == (clean["users"], clean["metrics"]), "exit 0 with another result"


# -- the project that queries files are checked against -------------------------------------------------------
@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("world")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GLOSS_HOME", str(root / "home"))
        mp.chdir(root)
        inter, items = synthetic_rows()
        _write_pair(root / "src", inter, items)
        for args in (["data", "--source", "src", "-p", "proj", "-q"], ["index", "-p", "proj", "-q"]):
            assert runner.invoke(app, args).exit_code == 0
        rows = _gloss_rows(root / "proj")
        (root / "q.json").write_text(json.dumps(rows))
        (root / "queries.jsonl").write_text(_as_jsonl(rows))
    return root


def _eval(world: Path, path: Path) -> Result:
    """The paper's recipe: it reads the file's 5 queries per user (a valid set of titles, as _valid_queries says)."""
    args = ["eval", "--recipe", "paper", "--queries", str(path), "-p", str(world / "proj"), "--json", "-q"]
    return runner.invoke(app, args)


@pytest.fixture(scope="module")
def clean_json(world: Path) -> dict[str, Any]:
    result = _eval(world, world / "q.json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def clean_jsonl(world: Path) -> dict[str, Any]:
    result = _eval(world, world / "queries.jsonl")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


# -- queries files: one entry changed ----------------------------------------------------------------------------
def _entry_change(fields: tuple[str, ...], queries_field: str) -> st.SearchStrategy[tuple[str, Any]]:
    """(how, value): set a field to a malformed value, drop a field, replace the entry, or a harmless change."""
    return st.one_of(
        st.tuples(st.sampled_from([f"set:{f}" for f in fields if f != queries_field]), VALUES),
        st.tuples(st.just(f"set:{queries_field}"), VALUES.filter(lambda v: not _valid_queries(v))),
        st.tuples(st.sampled_from([f"drop:{f}" for f in fields]), st.none()),
        st.tuples(st.just("replace"), SCALARS | st.lists(SCALARS, max_size=3)),
        st.tuples(st.just("extra-field"), VALUES),  # harmless: unknown fields are ignored
        st.tuples(st.just("repeat"), st.none()),  # harmless: an exact repeat of an entry
    )


def _apply(entries: list[Any], index: int, how: str, value: Any) -> list[Any]:
    entries = list(entries)
    entry = entries[index]
    if how.startswith("set:"):
        entries[index] = entry | {how[4:]: value}
    elif how.startswith("drop:"):
        entries[index] = {k: v for k, v in entry.items() if k != how[5:]}
    elif how == "replace":
        entries[index] = value
    elif how == "extra-field":
        entries[index] = entry | {"note": value}
    else:
        entries.append(entry)
    return entries


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=bool(next(_counter) % 2))  # both \u escapes and raw UTF-8


@FUZZ
@given(index=st.integers(0, 46), change=_entry_change(GLOSS_FIELDS, "generated_sequences"))
def test_gloss_json_never_a_wrong_number(
    world: Path, clean_json: dict[str, Any], index: int, change: tuple[str, Any]
) -> None:
    rows = json.loads((world / "q.json").read_text())
    path = Path(f"q{next(_counter)}.json")
    path.write_text(_dumps(_apply(rows, index % len(rows), *change)), encoding="utf-8", errors="surrogatepass")
    _check(_eval(world, path), clean_json)


@FUZZ
@given(
    index=st.integers(0, 46),
    change=_entry_change(GENERATED_FIELDS, "queries")
    | st.tuples(st.just("line"), TEXT),  # a line of anything (JSON or not) among the entries
)
def test_queries_jsonl_never_a_wrong_number(
    world: Path, clean_jsonl: dict[str, Any], index: int, change: tuple[str, Any]
) -> None:
    entries = [json.loads(line) for line in (world / "queries.jsonl").read_text().splitlines()]
    index %= len(entries)
    how, value = change
    lines = [_dumps(e) for e in (entries if how == "line" else _apply(entries, index, how, value))]
    if how == "line":
        lines.insert(index, value.replace("\n", " ").replace("\r", " "))
    path = Path(f"queries{next(_counter)}.jsonl")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8", errors="surrogatepass")
    _check(_eval(world, path), clean_jsonl)


# -- the compact CSV pair: one cell or the file's shape changed ---------------------------------------------------
_INTEGER = re.compile(r"\s*[+-]?[0-9]+\s*")
BAD_ID = st.sampled_from(["", " ", "\t"]) | st.text(min_size=1, max_size=6).map(lambda s: f" {s}")
BAD_TIMESTAMP = (
    st.text(max_size=12).filter(lambda s: not _INTEGER.fullmatch(s))
    | st.integers(2**63, 2**80).map(str)
    | st.integers(-(2**80), -(2**63) - 1).map(str)
    | st.floats(allow_nan=True).map(repr)
)
CSV_CHANGE = st.one_of(
    st.tuples(st.just("interactions"), st.sampled_from(["user_id", "item_id"]), BAD_ID),
    st.tuples(st.just("interactions"), st.just("timestamp"), BAD_TIMESTAMP),
    st.tuples(st.just("items"), st.just("item_id"), BAD_ID),
    st.tuples(st.sampled_from(["interactions", "items"]), st.sampled_from(["drop-column", "extra-field"]), st.none()),
    st.tuples(st.sampled_from(["interactions", "items"]), st.sampled_from(["header-only", "truncate"]), st.none()),
    # harmless: an extra column everywhere, a byte-order mark
    st.tuples(st.sampled_from(["interactions", "items"]), st.sampled_from(["extra-column", "bom"]), VALUES.map(str)),
)


def _write_pair(
    folder: Path, inter: list[list[Any]], items: list[list[Any]], raw: dict[str, bytes] | None = None
) -> None:
    """The pair as CSV, or ``raw`` bytes for a file named in it."""
    raw = raw or {}
    folder.mkdir(parents=True, exist_ok=True)
    for name, header, rows in (
        ("interactions", ["user_id", "item_id", "timestamp"], inter),
        ("items", ["item_id", "title"], items),
    ):
        data = raw.get(name) or _csv_bytes(header, rows)
        (folder / f"{name}.csv.gz").write_bytes(gzip.compress(data))


def _csv_bytes(header: list[str], rows: list[list[Any]]) -> bytes:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows([header, *rows])
    return buf.getvalue().encode("utf-8", errors="surrogatepass")


def _broken_pair(folder: Path, row: int, change: tuple[str, str, Any]) -> None:
    """The synthetic pair with one change in one file."""
    inter, items = synthetic_rows()
    name, how, value = change
    header = ["user_id", "item_id", "timestamp"] if name == "interactions" else ["item_id", "title"]
    rows = [list(r) for r in (inter if name == "interactions" else items)]
    row %= len(rows)
    if how in header:
        rows[row][header.index(how)] = value
        data = _csv_bytes(header, rows)
    elif how == "drop-column":
        data = _csv_bytes(header[:-1], [r[:-1] for r in rows])
    elif how == "extra-field":
        data = _csv_bytes(header, [*rows[:row], [*rows[row], "x"], *rows[row + 1 :]])
    elif how == "header-only":
        data = _csv_bytes(header, [])
    elif how == "truncate":
        data = _csv_bytes(header, rows)[: 10 + row]
    elif how == "extra-column":
        data = _csv_bytes([*header, "note"], [[*r, value] for r in rows])
    else:  # bom
        data = b"\xef\xbb\xbf" + _csv_bytes(header, rows)
    _write_pair(folder, inter, items, {name: data})


def _tables(project: Path) -> dict[str, pl.DataFrame]:
    return {name: pl.read_parquet(project / "data" / f"{name}.parquet") for name in ("items", "train", "test")}


@pytest.fixture(scope="module")
def clean_tables(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], dict[str, pl.DataFrame]]:
    root = tmp_path_factory.mktemp("clean")
    inter, items = synthetic_rows()
    _write_pair(root / "src", inter, items)
    result = runner.invoke(app, ["data", "--source", str(root / "src"), "-p", str(root / "proj"), "--json", "-q"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)["stats"], _tables(root / "proj")


@FUZZ
@given(row=st.integers(0, 400), change=CSV_CHANGE)
def test_compact_csv_never_a_wrong_number(
    clean_tables: tuple[dict[str, Any], dict[str, pl.DataFrame]], row: int, change: tuple[str, str, Any]
) -> None:
    n = next(_counter)
    _broken_pair(Path(f"src{n}"), row, change)
    result = runner.invoke(app, ["data", "--source", f"src{n}", "-p", f"proj{n}", "--json", "-q"])
    assert result.exit_code in (0, 1), (result.exit_code, result.output, result.exception)
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    if result.exit_code == 1:
        assert sum(line.startswith("error: ") for line in result.stderr.splitlines()) == 1, result.stderr
        assert not Path(f"proj{n}/data").exists()  # nothing half-written
        return
    stats, tables = clean_tables
    assert json.loads(result.stdout)["stats"] == stats, f"exit 0 with other stats after {change}"
    assert all(_tables(Path(f"proj{n}"))[k].equals(v) for k, v in tables.items()), f"other tables after {change}"
    shutil.rmtree(f"proj{n}")
