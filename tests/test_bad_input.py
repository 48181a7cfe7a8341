"""Every bad input: one error line + a hint, exit 1, no traceback, no partial output, manifest unchanged."""

from __future__ import annotations

import gzip
import json
from collections.abc import Callable
from pathlib import Path

import pytest
from typer.testing import CliRunner

from gloss_cli.cli import app
from tests.conftest import write_gz_csv

runner = CliRunner()


def _good_run(source: Path) -> str:
    result = runner.invoke(app, ["data", "--source", str(source), "-p", "proj", "-q"])
    assert result.exit_code == 0, result.output
    return Path("proj/manifest.json").read_text()


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _truncate(src: Path) -> None:
    data = (src / "interactions.csv.gz").read_bytes()
    (src / "interactions.csv.gz").write_bytes(data[: len(data) // 2])


def _malformed(src: Path) -> None:
    lines = gzip.decompress((src / "interactions.csv.gz").read_bytes()).decode().splitlines()
    lines[4] = "U001,I001,12,extra,fields"
    (src / "interactions.csv.gz").write_bytes(gzip.compress(("\n".join(lines) + "\n").encode()))


def _bad_timestamp(src: Path) -> None:
    lines = gzip.decompress((src / "interactions.csv.gz").read_bytes()).decode().splitlines()
    lines[6] = "U001,I001,yesterday"
    (src / "interactions.csv.gz").write_bytes(gzip.compress(("\n".join(lines) + "\n").encode()))


def _missing_column(src: Path) -> None:
    write_gz_csv(src / "interactions.csv.gz", ["user_id", "item_id"], [["U1", "I001"]])


def _empty(src: Path) -> None:
    (src / "items.csv.gz").write_bytes(gzip.compress(b""))


def _not_utf8(src: Path) -> None:
    data = gzip.decompress((src / "items.csv.gz").read_bytes())
    lines = data.split(b"\n")
    lines[3] = b"I777,Caf\xe9 cr\xe8me"  # latin-1 bytes
    (src / "items.csv.gz").write_bytes(gzip.compress(b"\n".join(lines)))


def _huge_title(src: Path) -> None:
    write_gz_csv(src / "items.csv.gz", ["item_id", "title"], [["I000", "ok"], ["I001", " ".join(["word"] * 10_000)]])


CASES: dict[str, tuple[Callable[[Path], None], str]] = {
    "truncated gz": (_truncate, "not a complete gzip file"),
    "malformed line": (_malformed, "interactions.csv.gz, line 5: expected 3 fields, found 5"),
    "bad integer": (_bad_timestamp, "line 7: timestamp 'yesterday' is not an integer"),
    "missing column": (_missing_column, "lacks column(s) timestamp"),
    "empty file": (_empty, "items.csv.gz is empty"),
    "non-utf8": (_not_utf8, "items.csv.gz, line 4: bytes that are not UTF-8"),
    "10,000-word title": (_huge_title, "title of 10,000 words"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_source_file(case: str, synthetic: Path) -> None:
    before_manifest = _good_run(synthetic)
    before = _snapshot(Path("proj"))
    breaker, message = CASES[case]
    breaker(synthetic)
    result = runner.invoke(app, ["data", "--source", str(synthetic), "-p", "proj"])
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()[-2:]  # progress messages may come before
    assert lines[0].startswith("error: ") and lines[1].startswith("hint: "), lines
    assert sum(line.startswith("error: ") for line in result.stderr.splitlines()) == 1
    assert message in lines[0]
    assert "Traceback" not in result.output
    assert Path("proj/manifest.json").read_text() == before_manifest
    assert _snapshot(Path("proj")) == before  # no partial output, no temp folder, no lock left behind


def test_unknown_dataset_is_one_line_and_exit_1() -> None:
    result = runner.invoke(app, ["data", "--dataset", "garden"])
    assert result.exit_code == 1
    assert result.stderr.splitlines()[0] == "error: Unknown dataset 'garden'."
    assert not Path("gloss-project").exists()


def test_source_without_data_files(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    result = runner.invoke(app, ["data", "--source", str(tmp_path / "empty")])
    assert result.exit_code == 1 and "holds no beauty data" in result.stderr


def test_bad_train_examples_value(synthetic: Path) -> None:
    result = runner.invoke(app, ["data", "--source", str(synthetic), "--train-examples", "some"])
    assert result.exit_code == 1 and "Unknown --train-examples 'some'" in result.stderr


def test_corrupt_manifest_is_reported_not_overwritten(synthetic: Path) -> None:
    Path("proj").mkdir()
    Path("proj/manifest.json").write_text("{not json")
    result = runner.invoke(app, ["data", "--source", str(synthetic), "-p", "proj"])
    assert result.exit_code == 1 and "is not valid JSON" in result.stderr
    assert Path("proj/manifest.json").read_text() == "{not json"
    assert not Path("proj/data").exists()


def test_debug_env_shows_the_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GLOSS_DEBUG", "1")
    result = runner.invoke(app, ["data", "--dataset", "garden"])
    assert result.exit_code != 0 and type(result.exception).__name__ == "GlossError"


def test_newer_manifest_schema_is_refused(synthetic: Path) -> None:
    _good_run(synthetic)
    doc = json.loads(Path("proj/manifest.json").read_text())
    doc["schema_version"] = 99
    Path("proj/manifest.json").write_text(json.dumps(doc))
    result = runner.invoke(app, ["status", "-p", "proj"])
    assert result.exit_code == 1 and "schema 99" in result.stderr and "pip install -U" in result.stderr
