"""Datasets beyond Amazon 2014 (issue 23): Amazon Reviews 2023 (raw reviews and the official benchmark splits) and
any interaction log (CSV / Parquet / JSON lines with a column map). Every fixture is written by the test."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import polars as pl
import pytest
from typer.testing import CliRunner

from gloss_cli.amazon2023 import CATEGORIES
from gloss_cli.cli import app
from gloss_cli.data import build_tables
from tests.amazon2023 import (
    CATEGORY,
    T1,
    T2,
    benchmark_splits,
    reviews_and_meta,
    spread_over_cutoffs,
    timestamp_splits,
    write_benchmark,
    write_jsonl,
)
from tests.conftest import synthetic_rows

runner = CliRunner()
SPLITS = ("items", "sequences", "train", "validation", "test")


def _gloss(*args: str) -> dict:  # type: ignore[type-arg]
    result = runner.invoke(app, ["data", *args, "--json", "-q"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def _frames(project: str) -> dict[str, pl.DataFrame]:
    return {name: pl.read_parquet(Path(project) / "data" / f"{name}.parquet") for name in SPLITS}


def _by_user(frame: pl.DataFrame) -> dict[str, tuple[str, list[str]]]:
    return {r["user_id"]: (r["target"], r["history"]) for r in frame.iter_rows(named=True)}


# -- Amazon Reviews 2023 ----------------------------------------------------------------------------------
def test_the_category_list_is_the_lab_s_33_plus_unknown() -> None:
    assert len(CATEGORIES) == len(set(CATEGORIES)) == 34 and "Unknown" in CATEGORIES
    assert {"All_Beauty", "Toys_and_Games", "Sports_and_Outdoors", "Video_Games", "CDs_and_Vinyl"} <= set(CATEGORIES)


@pytest.mark.parametrize("gz", [".gz", ""])
def test_raw_reviews_get_gloss_processing(tmp_path: Path, gz: str) -> None:
    reviews, meta = reviews_and_meta()
    write_jsonl(tmp_path / "src" / f"{CATEGORY}.jsonl{gz}", reviews)
    write_jsonl(tmp_path / "src" / f"meta_{CATEGORY}.jsonl{gz}", meta)
    doc = _gloss("-d", "amazon2023/all_beauty", "--source", "src", "-p", "p")  # the category's case is forgiven
    assert doc["dataset"] == "amazon2023/All_Beauty"
    # the same rows as a plain (user, item, time) table + (item, title) table give the same tables
    inter = pl.DataFrame(
        [(r["user_id"], r["parent_asin"], r["timestamp"]) for r in reviews],
        schema={"user_id": pl.String, "item_id": pl.String, "timestamp": pl.Int64},
        orient="row",
    )
    reviewed = set(inter["item_id"])
    items = pl.DataFrame([(m["parent_asin"], m["title"]) for m in meta if m["parent_asin"] in reviewed], orient="row")
    want = build_tables(inter, items.rename({"column_0": "item_id", "column_1": "title"}))
    got = _frames("p")
    for name in ("train", "validation", "test"):
        assert got[name].equals(want.splits[name]), name
    assert got["items"].equals(want.items)
    assert "B0UNREVIEW1" not in set(got["items"]["item_id"])  # the catalogue: reviewed items only
    assert "B000000005" not in set(got["items"]["item_id"])  # untitled: dropped
    assert max(len(t.split()) for t in got["items"]["title"]) == 25
    stage = json.loads(Path("p/manifest.json").read_text())["stages"]["data"]
    assert stage["params"]["source"] == {"kind": "amazon2023", "origin": "--source"}
    assert doc["stats"]["ties"]["measurable"] and doc["stats"]["validation_users"] == int(0.05 * doc["stats"]["users"])


@pytest.mark.parametrize(("variant", "header"), [("last_out_w_his", True), ("last_out", False)])
@pytest.mark.parametrize("train_examples", ["last", "all-prefixes"])
def test_benchmark_splits_are_the_published_ones(
    tmp_path: Path, variant: str, header: bool, train_examples: str
) -> None:
    reviews, meta = reviews_and_meta()
    for m in meta:
        m["title"] = m["title"] or "A title at last"
    published = benchmark_splits(reviews)
    write_benchmark(tmp_path / "src" / variant, published, history=variant.endswith("w_his"), header=header)
    write_jsonl(tmp_path / "src" / f"meta_{CATEGORY}.jsonl.gz", meta)
    doc = _gloss("-d", f"amazon2023/{CATEGORY}", "--benchmark", variant, "--source", "src", "-p", "p",
                 "--train-examples", train_examples)  # fmt: skip
    got = _frames("p")
    for ours, theirs in (("test", "test"), ("validation", "valid")):
        want = {row[0]: (row[1], his.split()) for row, his in published[theirs]}
        assert _by_user(got[ours]) == want, ours
    train = [(row[0], row[1], his.split()) for row, his in published["train"]]
    if train_examples == "last":
        last = {user: (item, his) for user, item, his in train}  # each user's last train row
        assert _by_user(got["train"]) == last
    else:
        rows = [(r["user_id"], r["target"], r["history"]) for r in got["train"].iter_rows(named=True)]
        assert sorted(rows) == sorted(row for row in train if row[2])  # every train row with a history
    stats = doc["stats"]
    assert stats["validation_users"] == stats["test_users"] == len(published["test"])  # every user validates
    assert all(c["equal"] == c["published"] > 0 for c in stats["benchmark"].values())
    assert stats["benchmark"]["test"]["history_compared"] == variant.endswith("w_his")
    assert doc["warnings"] == []
    stage = json.loads(Path("p/manifest.json").read_text())["stages"]["data"]
    assert stage["params"]["source"]["benchmark"] == variant and stage["params"]["validation_seed"] is None
    assert {e["role"] for e in stage["inputs"]} == {"train", "valid", "test", "items"}
    # the published test item is also what leave-one-out makes of the deduplicated 5-core reviews
    seq = {r["user_id"]: r["item_ids"] for r in got["sequences"].iter_rows(named=True)}
    assert all(seq[user][-1] == target for user, (target, _) in _by_user(got["test"]).items())


def test_benchmark_rows_with_an_untitled_item_are_dropped_counted_and_warned(tmp_path: Path) -> None:
    reviews, meta = reviews_and_meta()  # item 5 has an empty title
    published = benchmark_splits(reviews)
    write_benchmark(tmp_path / "src", published, history=True, header=True)
    write_jsonl(tmp_path / "src" / f"meta_{CATEGORY}.jsonl", meta)
    doc = _gloss("-d", f"amazon2023/{CATEGORY}", "--benchmark", "last_out_w_his", "--source", "src", "-p", "p")
    hit = {row[0] for row, his in published["test"] if "B000000005" in [row[1], *his.split()]}
    test = doc["stats"]["benchmark"]["test"]
    assert hit and test["published"] - test["equal"] == len(hit)
    assert any("published test rows differ" in w for w in doc["warnings"])


def _timestamp_source(tmp_path: Path, variant: str) -> dict[str, list[tuple[tuple[str, str, float, int], str]]]:
    reviews, meta = reviews_and_meta()
    for m in meta:
        m["title"] = m["title"] or "A title at last"
    published = timestamp_splits(spread_over_cutoffs(reviews))
    write_benchmark(tmp_path / "src" / variant, published, history=variant.endswith("w_his"), header=False)
    write_jsonl(tmp_path / "src" / f"meta_{CATEGORY}.jsonl.gz", meta)
    return published


@pytest.mark.parametrize("variant", ["timestamp_w_his", "timestamp"])
@pytest.mark.parametrize("train_examples", ["last", "all-prefixes"])
def test_timestamp_benchmark_scores_each_user_s_first_valid_and_test_row(
    tmp_path: Path, variant: str, train_examples: str
) -> None:
    published = _timestamp_source(tmp_path, variant)
    rows = {split: [(r[0], r[1], his.split()) for r, his in published[split]] for split in published}
    users = {split: [u for u, _, _ in rows[split]] for split in rows}
    # the fixture has every case: several test rows, no test row, only train, a first test row with no history
    several = {u for u in users["test"] if users["test"].count(u) > 1}
    assert several and set(users["train"]) - set(users["valid"]) - set(users["test"])
    assert set(users["valid"]) - set(users["test"]) and set(users["test"]) - set(users["train"]) - set(users["valid"])
    assert all(r[0][3] < T1 for r in published["train"]) and all(r[0][3] >= T2 for r in published["test"])
    doc = _gloss("-d", f"amazon2023/{CATEGORY}", "--benchmark", variant, "--source", "src", "-p", "p",
                 "--train-examples", train_examples)  # fmt: skip
    got = _frames("p")

    def first_with_history(split: str) -> dict[str, tuple[str, list[str]]]:
        first: dict[str, tuple[str, list[str]]] = {}
        for user, item, his in rows[split]:
            first.setdefault(user, (item, his))
        return {user: row for user, row in first.items() if row[1]}

    assert _by_user(got["test"]) == first_with_history("test")
    assert _by_user(got["validation"]) == first_with_history("valid")
    # the history of a test target is every earlier item: the train rows, then the valid rows
    user = next(iter(several & set(users["valid"])))
    assert _by_user(got["test"])[user][1] == [i for u, i, _ in rows["train"] + rows["valid"] if u == user]
    train = [(u, i, h) for u, i, h in rows["train"] if h]
    if train_examples == "last":
        assert _by_user(got["train"]) == {u: (i, h) for u, i, h in train}
    else:
        assert sorted((r["user_id"], r["target"], r["history"]) for r in got["train"].iter_rows(named=True)) == sorted(
            train
        )
    stats = doc["stats"]
    for ours, theirs in (("test", "test"), ("validation", "valid")):
        counts, n_users = stats["benchmark"][ours], len(set(users[theirs]))
        scored = len(first_with_history(theirs))
        assert counts["published"] == len(rows[theirs]) and counts["equal"] == counts["scored"] == scored > 0
        assert counts["later_rows"] == len(rows[theirs]) - n_users > 0
        assert counts["no_history"] == n_users - scored
        assert counts["history_compared"] == variant.endswith("w_his")
    assert stats["benchmark"]["test"]["no_history"] > 0  # the users only from T2 on
    assert stats["test_users"] == stats["benchmark"]["test"]["scored"] == stats["ties"]["test_targets"]["users"]
    assert stats["validation_users"] == stats["ties"]["validation_targets"]["users"]
    assert stats["benchmark"]["train"]["equal"] == stats["benchmark"]["train"]["scored"] == len(got["train"])
    (warning,) = doc["warnings"]
    test = stats["benchmark"]["test"]
    assert "scores each user's first test and first valid row only" in warning
    assert f"{test['later_rows']:,} of {test['published']:,} test" in warning
    stage = json.loads(Path("p/manifest.json").read_text())["stages"]["data"]
    assert stage["params"]["source"]["benchmark"] == variant


def test_timestamp_rows_on_the_wrong_side_of_a_cutoff_are_refused(tmp_path: Path) -> None:
    published = _timestamp_source(tmp_path, "timestamp_w_his")
    last_out = benchmark_splits(reviews_and_meta()[0])  # times before T1: not a timestamp split's valid rows
    write_benchmark(tmp_path / "src" / "timestamp_w_his", {**published, "valid": last_out["valid"]}, history=True,
                    header=True)  # fmt: skip
    result = runner.invoke(app, ["data", "-d", f"amazon2023/{CATEGORY}", "--benchmark", "timestamp_w_his",
                                 "--source", "src", "-p", "p", "-q"])  # fmt: skip
    assert result.exit_code == 1 and "All_Beauty.valid.csv.gz, row 1: timestamp" in result.stderr
    assert f"is not in [{T1}, {T2})" in result.stderr and not Path("p/manifest.json").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--benchmark", "timestamp_w_his", "--dedup"], "--dedup cannot apply to --benchmark"),
        (["--benchmark", "leave_two"], "Unknown --benchmark 'leave_two'"),
        (["--benchmark", "last_out", "--dedup"], "--dedup cannot apply to --benchmark"),
        (["--benchmark", "last_out", "--ties", "shuffle"], "--ties shuffle cannot apply to --benchmark"),
        (["--columns", "user=u"], "--columns applies to an interaction log"),
        ([], "holds no amazon2023/All_Beauty data"),
    ],
)
def test_amazon2023_flags_that_cannot_apply_are_refused(tmp_path: Path, args: list[str], message: str) -> None:
    (tmp_path / "src").mkdir()
    result = runner.invoke(app, ["data", "-d", "amazon2023/All_Beauty", "--source", "src", "-p", "p", "-q", *args])
    assert result.exit_code == 1 and message in result.stderr.splitlines()[0], result.stderr
    assert result.stderr.splitlines()[1].startswith("hint: ") and not Path("p/manifest.json").exists()


def test_an_unknown_category_lists_the_real_ones() -> None:
    result = runner.invoke(app, ["data", "-d", "amazon2023/Beauty"])
    assert result.exit_code == 1 and "Unknown Amazon 2023 category 'Beauty'" in result.stderr
    assert "All_Beauty, Amazon_Fashion" in result.stderr


def test_gloss_data_dir_holds_amazon2023_under_its_own_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    reviews, meta = reviews_and_meta()
    write_jsonl(tmp_path / "mirror/amazon2023" / CATEGORY / f"{CATEGORY}.jsonl.gz", reviews)
    write_jsonl(tmp_path / "mirror/amazon2023" / CATEGORY / f"meta_{CATEGORY}.jsonl.gz", meta)
    monkeypatch.setenv("GLOSS_DATA_DIR", str(tmp_path / "mirror"))
    _gloss("-d", f"amazon2023/{CATEGORY}", "-p", "p")
    stage = json.loads(Path("p/manifest.json").read_text())["stages"]["data"]
    assert stage["params"]["source"]["origin"] == "GLOSS_DATA_DIR"


# -- JSON lines (Amazon 2014 reviews, Amazon 2023 reviews and meta) ----------------------------------------
# Per family: the file the case breaks, its user / time fields, the other file and the args.
JSON_FAMILIES = {
    "amazon2014": ("reviews_Beauty_5.json.gz", "reviewerID", "unixReviewTime", ["-d", "beauty"]),
    "amazon2023": (f"{CATEGORY}.jsonl.gz", "user_id", "timestamp", ["-d", f"amazon2023/{CATEGORY}"]),
}


def _json_source(family: str) -> list[str]:
    """A good source folder of the family (src/); the lines of the file the cases break."""
    if family == "amazon2023":
        reviews, meta = reviews_and_meta()
        write_jsonl(Path("src", f"meta_{CATEGORY}.jsonl.gz"), meta)
    else:
        inter, items = synthetic_rows()
        reviews = [{"reviewerID": u, "asin": i, "unixReviewTime": t, "reviewText": "Fine."} for u, i, t in inter]
        meta_lines = "".join(repr({"asin": i, "title": t}) + "\n" for i, t in items)
        Path("src").mkdir()
        Path("src/meta_Beauty.json.gz").write_bytes(gzip.compress(meta_lines.encode()))
    return [json.dumps(r) for r in reviews]


def _break_json(family: str, case: str, lines: list[str]) -> tuple[bytes, str]:
    """The broken file's bytes (gzipped) and what the error line must say."""
    name, user, time, _ = JSON_FAMILIES[family]
    second = json.loads(lines[1])
    text = "\n".join(lines) + "\n"
    if case == "truncated gzip":
        whole = gzip.compress(text.encode())
        return whole[: len(whole) // 2], f"{name} is not a complete gzip file"
    if case == "not JSON":
        lines[2], message = lines[2][:-1], f"{name}, line 3: not valid JSON"
    elif case == "not an object":
        lines[1], message = "[1, 2]", f"{name}, line 2: not a JSON object"
    elif case == "time as text":
        lines[1], message = json.dumps(second | {time: "12"}), f"{name}, line 2: {time} '12' is not an integer"
    elif case == "time past int64":
        lines[1], message = json.dumps(second | {time: 2**64}), f"{name}, line 2: {time} '{2**64}' is not an integer of"
    elif case == "one record without a user":  # the blank line is not a record, but counts as a line
        lines[2:2] = ["", json.dumps({k: v for k, v in second.items() if k != user})]
        message = f"{name}, line 4: no {user} (1 of {len(lines) - 1:,} records lack one)"
    elif case == "an empty user":
        lines[1], message = json.dumps(second | {user: ""}), f"{name}, line 2: no {user} (1 of"
    elif case == "no record has a time":
        lines = [json.dumps({k: v for k, v in json.loads(t).items() if k != time}) for t in lines]
        message = f"{name} has no field(s) {time}"
    elif case == "empty file":
        lines, message = [], f"{name} is empty"
    elif case == "not UTF-8":
        return gzip.compress(text.encode().replace(b"\n", b"\n\xff", 1)), f"{name}, line 2: bytes that are not UTF-8"
    return gzip.compress("\n".join(lines).encode()), message


JSON_CASES = ["truncated gzip", "not JSON", "not an object", "time as text", "time past int64",
              "one record without a user", "an empty user", "no record has a time", "empty file",
              "not UTF-8"]  # fmt: skip


@pytest.mark.parametrize("case", JSON_CASES)
@pytest.mark.parametrize("family", list(JSON_FAMILIES))
def test_bad_json_lines_are_one_line_and_write_nothing(family: str, case: str) -> None:
    lines = _json_source(family)
    data, message = _break_json(family, case, lines)
    Path("src", JSON_FAMILIES[family][0]).write_bytes(data)
    result = runner.invoke(app, ["data", *JSON_FAMILIES[family][3], "--source", "src", "-p", "p", "-q"])
    errors = result.stderr.splitlines()
    assert result.exit_code == 1 and errors[0].startswith("error: ") and message in errors[0], result.stderr
    assert len(errors) == 2 and errors[1].startswith("hint: ") and not Path("p/manifest.json").exists()


def test_amazon2023_meta_without_an_item_id_is_refused() -> None:
    reviews, meta = reviews_and_meta()
    write_jsonl(Path("src", f"{CATEGORY}.jsonl.gz"), reviews)
    write_jsonl(Path("src", f"meta_{CATEGORY}.jsonl.gz"), [*meta[:3], {"title": "No id"}, *meta[3:]])
    result = runner.invoke(app, ["data", "-d", f"amazon2023/{CATEGORY}", "--source", "src", "-p", "p", "-q"])
    assert result.exit_code == 1 and f"meta_{CATEGORY}.jsonl.gz, line 4: no parent_asin" in result.stderr


# -- any interaction log ----------------------------------------------------------------------------------
def _log_frames() -> tuple[pl.DataFrame, pl.DataFrame]:
    """The synthetic compact dataset as a log with other column names (untitled items left out of the items file)."""
    inter, items = synthetic_rows()
    log = pl.DataFrame(inter, schema={"uid": pl.String, "iid": pl.String, "ts": pl.Int64}, orient="row")
    catalog = pl.DataFrame(items, schema={"iid": pl.String, "name": pl.String}, orient="row")
    return log.with_columns(rating=pl.lit(5.0)), catalog.filter(pl.col("name") != "")


def _write(frame: pl.DataFrame, path: Path) -> Path:
    if path.suffix == ".parquet":
        frame.write_parquet(path)
    elif ".jsonl" in path.suffixes:
        text = frame.write_ndjson().encode()
        path.write_bytes(gzip.compress(text) if path.suffix == ".gz" else text)
    else:
        frame.write_csv(path, separator="\t" if path.suffix == ".tsv" else ",")
    return path


COLUMNS = "user=uid,item=iid,time=ts,title=name"


FILES = [
    ("log.parquet", "items.csv"),
    ("log.jsonl.gz", "items.parquet"),
    ("log.csv", "items.jsonl"),
    ("log.tsv", "items.tsv"),
]


@pytest.mark.parametrize(("log_name", "items_name"), FILES)
def test_a_log_in_any_format_gives_the_compact_pair_s_tables(synthetic: Path, log_name: str, items_name: str) -> None:
    log, items = _log_frames()
    _write(log, Path(log_name)), _write(items, Path(items_name))
    doc = _gloss("--source", log_name, "--items", items_name, "--columns", COLUMNS, "-p", "log")
    _gloss("--source", str(synthetic), "-p", "ref")
    got, want = _frames("log"), _frames("ref")
    for name in SPLITS:
        assert got[name].equals(want[name]), name
    assert doc["dataset"] == "log" and doc["stats"]["time_unit"] == "s"
    stage = json.loads(Path("log/manifest.json").read_text())["stages"]["data"]
    assert stage["params"]["source"]["columns"]["user"] == "uid"
    assert stage["command"].startswith(f"gloss data --source {log_name} --items {items_name} --columns")


@pytest.mark.parametrize(
    ("convert", "unit"),
    [
        (lambda ts: ts * 1000, "ms"),
        (lambda ts: ts.cast(pl.Float64), "s"),
        (lambda ts: pl.from_epoch(ts, "s").dt.strftime("%Y-%m-%dT%H:%M:%SZ"), "ms"),
        (lambda ts: pl.from_epoch(ts, "s").dt.strftime("%Y-%m-%d %H:%M:%S"), "ms"),
        (lambda ts: pl.from_epoch(ts, "s"), "ms"),
        (lambda ts: ts.cast(pl.String), "s"),
    ],
    ids=["int-ms", "whole-float", "iso-utc", "iso-naive", "datetime", "int-as-text"],
)
def test_times_of_any_kind_give_the_same_splits(synthetic: Path, convert, unit: str) -> None:  # type: ignore[no-untyped-def]
    log, items = _log_frames()
    _write(log.with_columns(convert(pl.col("ts")).alias("ts")), Path("log.parquet"))
    _write(items, Path("items.parquet"))
    doc = _gloss("--source", "log.parquet", "--items", "items.parquet", "--columns", COLUMNS, "-p", "log")
    _gloss("--source", str(synthetic), "-p", "ref")
    got, want = _frames("log"), _frames("ref")
    for name in ("train", "validation", "test"):
        assert got[name].equals(want[name]), name
    assert doc["stats"]["time_unit"] == unit


def test_ms_times_measure_ties_at_the_millisecond() -> None:
    log, items = _log_frames()
    # a millisecond apart for each row: no two of a user's items share a time any more
    log = log.with_columns(ts=pl.col("ts") * 1000 + pl.int_range(pl.len()))
    _write(log, Path("log.parquet")), _write(items, Path("items.csv"))
    doc = _gloss("--source", "log.parquet", "--items", "items.csv", "--columns", COLUMNS, "-p", "log")
    assert doc["stats"]["ties"]["neighbour_pairs"]["same_day"] == 0 and doc["stats"]["time_unit"] == "ms"


def _bad(setup: str) -> tuple[list[str], str]:
    """Write a log and items file broken as ``setup`` says; return the extra args and the expected message."""
    log, items = _log_frames()
    args, message = ["--columns", COLUMNS], ""
    if setup == "missing column":
        log, message = log.drop("ts"), "log.csv has no column(s) ts"
    elif setup == "unparseable time":
        log = log.with_columns(pl.col("ts").cast(pl.String)).with_columns(
            pl.when(pl.int_range(pl.len()) == 4).then(pl.lit("yesterday")).otherwise("ts").alias("ts")
        )
        message = "log.csv, row 5: time 'yesterday' in 'ts' is not an integer, as the column's first value"
    elif setup == "unparseable datetime":
        log = log.with_columns(pl.from_epoch("ts", "s").dt.strftime("%Y-%m-%dT%H:%M:%S")).with_columns(
            pl.when(pl.int_range(pl.len()) == 4).then(pl.lit("2014-13-45T00:00:00")).otherwise("ts").alias("ts")
        )
        message = "log.csv, row 5: time '2014-13-45T00:00:00' in 'ts' is neither an integer nor an ISO 8601 datetime"
    elif setup == "mixed units":
        third = pl.int_range(pl.len()) == 2
        log = log.with_columns(pl.when(third).then(pl.col("ts") * 1000).otherwise("ts").alias("ts"))
        message = "time column 'ts' is ambiguous"
    elif setup == "fractional time":
        log, message = log.with_columns(pl.col("ts").cast(pl.Float64) + 0.5), "row 1: time"
    elif setup == "empty user":
        log = log.with_columns(pl.when(pl.int_range(pl.len()) == 6).then(pl.lit("")).otherwise("uid").alias("uid"))
        message = "log.csv, row 7: empty uid (the user_id)"
    elif setup == "duplicate item":
        items, message = pl.concat([items, items.head(1)]), "item I000 is listed twice (rows 1 and "
    elif setup == "untitled item":
        items = items.with_columns(pl.when(pl.col("iid") == "I002").then(pl.lit("  ")).otherwise("name").alias("name"))
        message = "items.csv, row 3: item I002 has no name (1 of"
    elif setup == "bad key":
        args, message = ["--columns", "user=uid,when=ts"], "--columns: 'when=ts' is not key=value"
    elif setup == "bad unit":
        args, message = ["--columns", COLUMNS + ",time_unit=days"], "unknown time_unit 'days'"
    elif setup == "no items":
        args, message = ["--columns", COLUMNS, "--items", "missing.csv"], "missing.csv does not exist"
    elif setup == "unknown format":
        args, message = ["--columns", COLUMNS, "--items", "items.xlsx"], "items.xlsx: cannot tell its format"
        Path("items.xlsx").write_text("x")
    elif setup == "benchmark on a log":
        args, message = ["--columns", COLUMNS, "--benchmark", "last_out"], "--benchmark applies to Amazon 2023"
    elif setup == "log with an Amazon 2014 dataset":
        args, message = ["--columns", COLUMNS, "-d", "beauty"], "--items applies to an interaction log"
    _write(log, Path("log.csv")), _write(items, Path("items.csv"))
    return args, message


BAD = ["missing column", "unparseable time", "unparseable datetime", "mixed units", "fractional time", "empty user",
       "duplicate item", "untitled item", "bad key", "bad unit", "no items", "unknown format", "benchmark on a log",
       "log with an Amazon 2014 dataset"]  # fmt: skip


@pytest.mark.parametrize("setup", BAD)
def test_a_bad_log_is_one_line_and_writes_nothing(setup: str) -> None:
    log, items = _log_frames()
    _write(log, Path("good.csv")), _write(items, Path("good_items.csv"))
    _gloss("--source", "good.csv", "--items", "good_items.csv", "--columns", COLUMNS, "-p", "proj")
    before = {p: p.read_bytes() for p in Path("proj").rglob("*") if p.is_file()}
    args, message = _bad(setup)
    items_arg = [] if "--items" in args else ["--items", "items.csv"]
    result = runner.invoke(app, ["data", "--source", "log.csv", *items_arg, *args, "-p", "proj", "-q"])
    lines = result.stderr.splitlines()
    assert result.exit_code == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr
    assert lines[1].startswith("hint: ") and "Traceback" not in result.output
    assert {p: p.read_bytes() for p in Path("proj").rglob("*") if p.is_file()} == before


def test_a_log_needs_its_items_file_and_a_file_source(synthetic: Path) -> None:
    _write(_log_frames()[0], Path("log.csv"))
    for args, message in (
        (["--source", "log.csv"], "An interaction log needs --items ITEMS_FILE"),
        (["-d", "log", "--source", str(synthetic)], "An interaction log needs --source LOG_FILE"),
        (["--source", "log.csv", "-d", "beauty"], "--source log.csv is a file; for dataset beauty it names a folder"),
    ):
        result = runner.invoke(app, ["data", *args, "-p", "p"])
        assert result.exit_code == 1 and message in result.stderr, result.stderr


@pytest.mark.slow
def test_beauty_as_a_log_reproduces_the_pinned_baselines(shared_data: Path) -> None:
    """Amazon 2014 Beauty turned into a Parquet log with other column names and ISO times gives the README's
    numbers: the generic path is GLoSS's processing, not an approximation of it."""
    read = {"infer_schema": False}
    inter = pl.read_csv(shared_data / "beauty/interactions.csv.gz", **read)  # type: ignore[arg-type]
    items = pl.read_csv(shared_data / "beauty/items.csv.gz", **read)  # type: ignore[arg-type]
    log = inter.select(uid="user_id", iid="item_id", ts=pl.from_epoch(pl.col("timestamp").cast(pl.Int64), "s"))
    log.write_parquet("beauty.parquet")
    titled = items.filter(pl.col("title").fill_null("").str.strip_chars() != "")
    titled.select(iid="item_id", title="title").write_ndjson("items.jsonl")
    _gloss("--source", "beauty.parquet", "--items", "items.jsonl", "--columns", "user=uid,item=iid,time=ts", "-p", "p")
    for recipe, want in (("lis-paper users=all", (0.0431, 0.0230)), ("transitions users=all", (0.0680, 0.0503))):
        result = runner.invoke(app, ["eval", "--recipe", recipe, "-p", "p", "--json", "-q"])
        assert result.exit_code == 0, result.output
        metrics = json.loads(result.stdout)["metrics"]
        assert (round(metrics["recall@5"], 4), round(metrics["ndcg@5"], 4)) == want, recipe
