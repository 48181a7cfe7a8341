"""Any interaction log: a CSV, Parquet or JSON-lines file of (user, item, time) rows plus an items file with titles.

``gloss data --source log.parquet --items items.csv --columns user=uid,item=iid,time=ts,title=name``

* Formats, by file name: ``.csv`` / ``.tsv`` (header line; every cell read as text), ``.parquet``, ``.jsonl`` /
  ``.ndjson`` (one object per line); CSV and JSON lines may be gzipped (``.gz``). Both files are scanned lazily
  (``pl.scan_*``) and only the mapped columns are read, with polars' streaming engine: a log's other columns (review
  text, ratings) never reach memory.
* ``--columns``: ``user``, ``item``, ``time`` and ``title`` name the log's and the items file's columns (defaults
  ``user_id``, ``item_id``, ``timestamp``, ``title``; ``item`` names the item column of both files), ``time_unit``
  says what the times are (see :func:`parse_times`).
* Times: integers (native or as text) are kept as they are, so ties stay exactly what the file says; their unit is
  read from the largest value (< 1e11 s, < 1e14 ms, < 1e17 µs, else ns) and the input is refused as ambiguous when the
  smallest value falls in another class (a mix of units, or a stray 0): ``time_unit=s|ms|us|ns`` then names it.
  Whole floats count as integers. Datetimes (native, or ISO 8601 text such as ``2023-05-01T10:00:00Z``; naive times
  are read as UTC) become epoch milliseconds (``time_unit=iso`` insists on text datetimes).
* Refused, in one line naming the file and the row: a missing column, an empty user/item/time, an unparseable time,
  an item id listed twice in the items file, an item whose title is empty.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl

from gloss_cli.errors import GlossError

TIME_UNITS = ("s", "ms", "us", "ns", "iso")
# Upper bounds (exclusive) of an epoch time's magnitude in each unit: 1e11 s is the year 5138, 1e11 ms is 1973.
UNIT_BOUNDS = (("s", 1e11), ("ms", 1e14), ("us", 1e17))
_INTEGER = r"^\s*[+-]?[0-9]+\s*$"
FORMATS = {
    ".csv": "csv",
    ".tsv": "csv",
    ".parquet": "parquet",
    ".pq": "parquet",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "jsonl",
}


@dataclass(frozen=True)
class ColumnMap:
    """Which of a log's columns hold the user, the item, the time and (in the items file) the title."""

    user: str = "user_id"
    item: str = "item_id"
    time: str = "timestamp"
    title: str = "title"
    time_unit: str | None = None  # None: read from the values (see parse_times)

    def as_dict(self) -> dict[str, str | None]:
        return {
            "user": self.user,
            "item": self.item,
            "time": self.time,
            "title": self.title,
            "time_unit": self.time_unit,
        }


def parse_columns(text: str | None) -> ColumnMap:
    """``user=uid,item=iid,time=ts[,title=name][,time_unit=ms]`` -> ColumnMap (unnamed keys keep their default)."""
    if not text:
        return ColumnMap()
    fields: dict[str, str] = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not value or key not in ColumnMap.__dataclass_fields__:
            raise GlossError(
                f"--columns: '{part}' is not key=value with a key among user, item, time, title, time_unit.",
                "E.g. --columns user=uid,item=iid,time=ts,title=name,time_unit=ms.",
            )
        if key in fields:
            raise GlossError(f"--columns names '{key}' twice.", "Give each key once.")
        fields[key] = value
    if fields.get("time_unit", "s") not in TIME_UNITS:
        raise GlossError(
            f"--columns: unknown time_unit '{fields['time_unit']}'.", f"Use one of: {', '.join(TIME_UNITS)}."
        )
    return ColumnMap(**fields)


def file_format(path: Path) -> str:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    kind = FORMATS.get(suffixes[-1]) if suffixes else None
    if kind is None or (kind == "parquet" and path.name.lower().endswith(".gz")):
        raise GlossError(
            f"{path}: cannot tell its format from the name.",
            "Name it .csv, .tsv, .parquet or .jsonl (.csv.gz / .jsonl.gz when gzipped).",
        )
    return kind


def scan(path: Path) -> pl.LazyFrame:
    """A lazy scan of the file; CSV cells as text (times are parsed by :func:`parse_times`, ids stay strings)."""
    if not path.is_file():
        raise GlossError(f"{path} does not exist.", "Check the path.")
    if path.stat().st_size == 0:
        raise GlossError(f"{path} is empty.", "Point gloss at a file with a header and rows.")
    kind = file_format(path)
    if kind == "parquet":
        return pl.scan_parquet(path)
    if kind == "jsonl":
        return pl.scan_ndjson(path, infer_schema_length=10_000)
    separator = "\t" if ".tsv" in [s.lower() for s in path.suffixes] else ","
    return pl.scan_csv(path, separator=separator, infer_schema=False)


def select(path: Path, columns: dict[str, str]) -> pl.DataFrame:
    """``columns`` (wanted name -> the file's name) of the file, read with the streaming engine; a missing column or
    a file polars cannot read is one GlossError."""
    frame = scan(path)
    try:
        have = frame.collect_schema().names()
    except (pl.exceptions.PolarsError, OSError) as exc:
        raise GlossError(f"{path}: cannot be read ({str(exc).splitlines()[0]}).", "Check the file's format.") from None
    missing = [name for name in dict.fromkeys(columns.values()) if name not in have]
    if missing:
        shown = ", ".join(have[:12]) + (", ..." if len(have) > 12 else "")
        raise GlossError(
            f"{path} has no column(s) {', '.join(missing)} (it has: {shown}).",
            "Map the columns with --columns user=...,item=...,time=...,title=... .",
        )
    try:
        out = frame.select(**{new: pl.col(old) for new, old in columns.items()}).collect(engine="streaming")
    except (pl.exceptions.PolarsError, OSError) as exc:
        raise GlossError(f"{path}: cannot be read ({str(exc).splitlines()[0]}).", "Check the file's format.") from None
    if out.height == 0:
        raise GlossError(f"{path} has no rows.", "Each row after the header is one record.")
    return out


def _first_row(frame: pl.DataFrame, bad: pl.Expr) -> int:
    return int(frame.with_row_index("_r").filter(bad).get_column("_r")[0]) + 1


def _check_ids(path: Path, frame: pl.DataFrame, columns: dict[str, str]) -> pl.DataFrame:
    """Ids as trimmed, non-empty strings (a number id 42 becomes '42')."""
    for new, old in columns.items():
        frame = frame.with_columns(pl.col(new).cast(pl.String).str.strip_chars())
        empty = pl.col(new).is_null() | (pl.col(new) == "")
        if frame.select(empty.any()).item():
            row = _first_row(frame, empty)
            raise GlossError(f"{path}, row {row}: empty {old} (the {new}).", "Fill it in or remove that row.")
    return frame


def _integer_unit(path: Path, column: str, times: pl.Series) -> str:
    """The unit of epoch integers read from their magnitude, or a GlossError when the values mix classes."""

    def unit(value: float) -> str:
        return next((name for name, bound in UNIT_BOUNDS if value < bound), "ns")

    lo, hi = abs(float(times.min())), abs(float(times.max()))  # type: ignore[arg-type]
    lo, hi = min(lo, hi), max(lo, hi)
    if unit(lo) != unit(hi):
        raise GlossError(
            f"{path}: time column '{column}' is ambiguous: its values run from {int(times.min()):,} "  # type: ignore[arg-type]
            f"to {int(times.max()):,}, which reads as {unit(lo)} at one end and {unit(hi)} at the other.",  # type: ignore[arg-type]
            "Name the unit with --columns ...,time_unit=s (or ms, us, ns).",
        )
    return unit(hi)


def parse_times(path: Path, column: str, times: pl.Series, unit: str | None) -> tuple[pl.Series, str]:
    """(Int64 times, their unit) from a time column of any type; see the module docstring for the rules."""
    if times.null_count():
        row = times.is_null().arg_true()[0] + 1
        raise GlossError(f"{path}, row {row}: empty {column} (the time).", "Fill it in or remove that row.")
    dtype: Any = times.dtype
    if dtype == pl.String and unit != "iso" and re.fullmatch(_INTEGER, times[0]):
        # the first time is an integer: every one must be
        integer = times.str.contains(_INTEGER)
        if not integer.all():
            row = (~integer).arg_true()[0] + 1
            raise GlossError(
                f"{path}, row {row}: time '{times[row - 1][:40]}' in '{column}' is not an integer, as the column's "
                f"first value '{times[0][:40]}' is.",
                "Give every row the same time format: epoch integers or ISO 8601 datetimes.",
            )
        times, dtype = times.str.strip_chars().cast(pl.Int64, strict=False), pl.Int64
        if times.null_count():
            raise GlossError(f"{path}: time column '{column}' has integers past 64 bits.", "Check the column.")
    if dtype.is_float():
        whole = times.is_finite() & (times == times.floor())
        if not whole.all():
            row = (~whole).arg_true()[0] + 1
            raise GlossError(
                f"{path}, row {row}: time {times[row - 1]} in '{column}' is not a whole number.",
                "Give integer epoch times (s, ms, ...) or ISO 8601 datetimes.",
            )
        times, dtype = times.cast(pl.Int64), pl.Int64
    if dtype.is_integer():
        if unit == "iso":
            raise GlossError(f"{path}: time column '{column}' holds integers, not datetimes.", "Drop time_unit=iso.")
        times = times.cast(pl.Int64, strict=False)
        if times.null_count():
            raise GlossError(f"{path}: time column '{column}' has integers past 64 bits.", "Check the column.")
        return times, unit or _integer_unit(path, column, times)
    if unit not in (None, "iso"):
        raise GlossError(
            f"{path}: time column '{column}' holds {dtype} values, not integers in {unit}.",
            "Drop time_unit (datetimes are read as such) or give integer times.",
        )
    if dtype == pl.String:
        parsed = times.str.to_datetime(time_unit="ms", time_zone="UTC", strict=False)
        bad = parsed.is_null()
        if bad.any():
            row = bad.arg_true()[0] + 1
            raise GlossError(
                f"{path}, row {row}: time '{times[row - 1][:40]}' in '{column}' is neither an integer nor an ISO 8601 "
                f"datetime in the column's format (its first value: '{times[0][:40]}').",
                "Give every row the same time format: epoch integers or ISO 8601 datetimes.",
            )
        times, dtype = parsed, parsed.dtype
    if dtype == pl.Date or isinstance(dtype, pl.Datetime):
        return times.cast(pl.Datetime("ms")).dt.epoch("ms") if dtype == pl.Date else times.dt.epoch("ms"), "ms"
    raise GlossError(f"{path}: time column '{column}' holds {dtype} values.", "Give integers or datetimes.")


def read_log(path: Path, columns: ColumnMap) -> tuple[pl.DataFrame, str]:
    """(interactions[user_id, item_id, timestamp] in file order, the times' unit)."""
    frame = select(path, {"user_id": columns.user, "item_id": columns.item, "timestamp": columns.time})
    frame = _check_ids(path, frame, {"user_id": columns.user, "item_id": columns.item})
    times, unit = parse_times(path, columns.time, frame.get_column("timestamp"), columns.time_unit)
    return frame.with_columns(times.alias("timestamp")), unit


def read_items(path: Path, columns: ColumnMap) -> pl.DataFrame:
    """items[item_id, title]: every item once, every title non-empty."""
    frame = _check_ids(path, select(path, {"item_id": columns.item, "title": columns.title}), {"item_id": columns.item})
    frame = frame.with_columns(pl.col("title").cast(pl.String))
    twice = pl.col("item_id").is_duplicated()
    if frame.select(twice.any()).item():
        rows = frame.with_row_index("_r").filter(twice)
        item = rows.get_column("item_id")[0]
        where = rows.filter(pl.col("item_id") == item).get_column("_r").head(2).to_list()
        raise GlossError(
            f"{path}: item {item} is listed twice (rows {where[0] + 1} and {where[1] + 1}); "
            f"{rows.get_column('item_id').n_unique():,} item ids repeat.",
            "Keep one row per item.",
        )
    untitled = pl.col("title").is_null() | (pl.col("title").str.replace_all(r"\s+", "") == "")
    count = frame.select(untitled.sum()).item()
    if count:
        row = _first_row(frame, untitled)
        raise GlossError(
            f"{path}, row {row}: item {frame.get_column('item_id')[row - 1]} has no {columns.title} "
            f"({count:,} of {frame.height:,} items lack one).",
            "Give every item a title, or remove the untitled rows (GLoSS drops an untitled item's interactions).",
        )
    return frame


def describe(path: Path) -> str:
    """The file's format in words, for messages."""
    return re.sub("jsonl", "JSON lines", file_format(path)).replace("csv", "CSV").replace("parquet", "Parquet")
