"""Where a dataset's files come from, and reading them safely: Amazon 2014 here; Amazon Reviews 2023
(``amazon2023/<Category>``) in :mod:`gloss_cli.amazon2023`; any interaction log (``log``) in :mod:`gloss_cli.logs`.

Order: ``--source DIR``, then ``$GLOSS_DATA_DIR/<dataset>/``, then a download of the original McAuley files
(cached under ``$GLOSS_HOME/downloads``). A folder may hold either format:

* original: ``reviews_<Category>_5.json.gz`` (JSON lines, scanned lazily by :func:`read_json_fields`, which reads
  every JSON-lines dataset file) + ``meta_<Category>.json.gz`` (Python literals, one per line, parsed with
  ``ast.literal_eval``);
* compact: ``interactions.csv.gz`` (user_id,item_id,timestamp) + ``items.csv.gz`` (item_id,title).

Every reading error becomes a one-line :class:`GlossError` naming the file (and the line where it can).
"""

from __future__ import annotations

import ast
import csv
import gzip
import io
import itertools
import json
import os
import re
import urllib.error
import urllib.request
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl

from gloss_cli.console import Reporter
from gloss_cli.errors import GlossError
from gloss_cli.project import sha256_file

AMAZON_2014_URL = "http://snap.stanford.edu/data/amazon/productGraph/categoryFiles/"
# A raw title longer than this is not a product title but a broken file (an unclosed quote swallowing rows).
MAX_RAW_TITLE_WORDS = 1000


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    category: str  # McAuley's file-name category
    # Canonical counts after GLoSS processing (no --dedup), used to warn on any difference.
    canonical: dict[str, int] = field(default_factory=dict)
    family: str = "amazon2014"  # "amazon2014" | "amazon2023" | "log"


DATASETS: dict[str, DatasetInfo] = {
    "beauty": DatasetInfo(
        "beauty",
        "Beauty",
        {"test_users": 22_363, "items": 12_094, "validation_users": 1_118, "interactions": 198_371},
    ),
    "toys": DatasetInfo(
        "toys",
        "Toys_and_Games",
        {"test_users": 19_395, "items": 11_865, "validation_users": 969, "interactions": 166_738},
    ),
    "sports": DatasetInfo(
        "sports",
        "Sports_and_Outdoors",
        {"test_users": 35_597, "items": 18_267, "validation_users": 1_779, "interactions": 295_111},
    ),
}


# Any interaction log: ``gloss data --source LOG_FILE --items ITEMS_FILE [--columns ...]``.
LOG = DatasetInfo("log", "", family="log")


def dataset_info(name: str) -> DatasetInfo:
    info = DATASETS.get(name.lower())
    if info is not None:
        return info
    if name.lower() == LOG.name:
        return LOG
    if name.lower().startswith("amazon2023/"):
        from gloss_cli.amazon2023 import dataset

        return dataset(name)
    raise GlossError(
        f"Unknown dataset '{name}'.",
        f"Use one of: {', '.join(DATASETS)}, amazon2023/<Category> (e.g. amazon2023/All_Beauty), "
        "or log (an interaction log: --source FILE --items FILE).",
    )


def gloss_home() -> Path:
    return Path(os.environ.get("GLOSS_HOME") or Path.home() / ".cache" / "gloss").expanduser()


@dataclass
class Source:
    kind: str  # "compact" | "original" (Amazon 2014) | "amazon2023" | "benchmark" (Amazon 2023 splits) | "log"
    origin: str  # "--source" | "GLOSS_DATA_DIR" | "download"
    interactions: Path
    items: Path
    downloads: list[dict[str, Any]] = field(default_factory=list)
    splits: dict[str, Path] = field(default_factory=dict)  # benchmark: the train / valid / test files
    columns: Any = None  # log: its logs.ColumnMap
    notes: dict[str, Any] = field(default_factory=dict)  # what reading found (a log's time unit)

    def files(self) -> list[tuple[str, Path]]:
        """(role, path) of every input file, as the manifest records them."""
        if self.kind == "benchmark":
            return [*self.splits.items(), ("items", self.items)]
        return [("interactions", self.interactions), ("items", self.items)]


def original_names(info: DatasetInfo) -> tuple[str, str]:
    return f"reviews_{info.category}_5.json.gz", f"meta_{info.category}.json.gz"


def find_in_dir(folder: Path, info: DatasetInfo, origin: str) -> Source | None:
    if (folder / "interactions.csv.gz").is_file() and (folder / "items.csv.gz").is_file():
        return Source("compact", origin, folder / "interactions.csv.gz", folder / "items.csv.gz")
    reviews, meta = original_names(info)
    if (folder / reviews).is_file() and (folder / meta).is_file():
        return Source("original", origin, folder / reviews, folder / meta)
    return None


def locate(
    info: DatasetInfo,
    source: Path | None,
    reporter: Reporter,
    *,
    items: Path | None = None,
    columns: str | None = None,
    benchmark: str | None = None,
) -> Source:
    """The dataset's files, refusing a flag that cannot apply to its family."""
    family = info.family
    if family != "log":
        flag = "--items" if items is not None else "--columns" if columns is not None else None
        if flag:
            raise GlossError(
                f"{flag} applies to an interaction log (--source FILE), not to dataset {info.name}.",
                f"Drop {flag}, or pass the log as --source FILE without --dataset.",
            )
        if source is not None and source.is_file():
            raise GlossError(
                f"--source {source} is a file; for dataset {info.name} it names a folder.",
                "An interaction log needs --items too, without --dataset: gloss data --source LOG --items ITEMS.",
            )
    if benchmark is not None and family != "amazon2023":
        raise GlossError(
            f"--benchmark applies to Amazon 2023 datasets, not to {info.name}.",
            "Drop --benchmark, or use --dataset amazon2023/<Category>.",
        )
    if family == "amazon2023":
        from gloss_cli import amazon2023

        if benchmark is not None:
            amazon2023.check_benchmark(benchmark)
        return amazon2023.resolve(info, source, benchmark, reporter)
    if family == "log":
        from gloss_cli.logs import parse_columns

        if source is None or not source.is_file() or items is None:
            what = "--items ITEMS_FILE" if source is not None and source.is_file() else "--source LOG_FILE"
            raise GlossError(
                f"An interaction log needs {what}.",
                "E.g. gloss data --source log.parquet --items items.csv --columns user=uid,item=iid,time=ts.",
            )
        return Source("log", "--source", source, items, columns=parse_columns(columns))
    return resolve_source(info, source, reporter)


def resolve_source(info: DatasetInfo, source: Path | None, reporter: Reporter) -> Source:
    reviews, meta = original_names(info)
    expected = f"interactions.csv.gz + items.csv.gz, or {reviews} + {meta}"
    if source is not None:
        for folder in (source, source / info.name):
            if folder.is_dir() and (found := find_in_dir(folder, info, "--source")):
                return found
        raise GlossError(
            f"--source {source} holds no {info.name} data (expected {expected}).",
            "Point --source at the folder with those files.",
        )
    mirror = os.environ.get("GLOSS_DATA_DIR")
    if mirror:
        folder = Path(mirror).expanduser() / info.name
        if found := find_in_dir(folder, info, "GLOSS_DATA_DIR"):
            return found
        raise GlossError(
            f"GLOSS_DATA_DIR={mirror} has no {info.name}/ folder with {expected}.",
            "Fix GLOSS_DATA_DIR, or unset it to download the original files.",
        )
    return download_original(info, reporter)


# -- download ---------------------------------------------------------------------------------------------
def download_original(info: DatasetInfo, reporter: Reporter) -> Source:
    base = os.environ.get("GLOSS_AMAZON_URL", AMAZON_2014_URL).rstrip("/") + "/"
    folder = gloss_home() / "downloads" / "amazon2014" / info.name
    records = [download(base + name, folder / name, reporter) for name in original_names(info)]
    reviews, meta = (folder / name for name in original_names(info))
    return Source("original", "download", reviews, meta, records)


def download(url: str, dest: Path, reporter: Reporter, chunk: int = 2**16) -> dict[str, Any]:
    """Fetch ``url`` to ``dest`` via ``dest.part``, resuming a partial download with an HTTP Range request."""
    if dest.is_file():
        return {"url": url, "path": str(dest), "size": dest.stat().st_size, "sha256": sha256_file(dest)}
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.is_file() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        response = urllib.request.urlopen(request, timeout=60)
    except urllib.error.HTTPError as exc:
        if exc.code != 416 or not have:  # 416: the part file already holds everything
            raise GlossError(
                f"Download of {url} failed: HTTP {exc.code} {exc.reason}.",
                "Pass --source DIR or set GLOSS_DATA_DIR to a folder holding the files.",
            ) from None
        response = None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise GlossError(
            f"Could not download {url} ({reason}).",
            "Check the network, or pass --source DIR / set GLOSS_DATA_DIR to a folder holding the files.",
        ) from None
    if response is not None:
        with response:
            resumed = response.status == 206
            if not resumed:
                have = 0  # the server ignored the range: start over
            length = response.headers.get("Content-Length")
            total = have + int(length) if length else None
            with (
                part.open("ab" if resumed else "wb") as fh,
                reporter.progress(f"download {dest.name}", total, bytes_=True) as tick,
            ):
                tick.advance(have)
                try:
                    while block := response.read(chunk):
                        fh.write(block)
                        tick.advance(len(block))
                except OSError as exc:
                    raise GlossError(
                        f"Download of {url} broke off ({exc}).",
                        "Run the same command again: it resumes where it stopped.",
                    ) from None
            if total is not None and part.stat().st_size != total:
                raise GlossError(
                    f"Download of {url} ended early ({part.stat().st_size} of {total} bytes).",
                    "Run the same command again: it resumes where it stopped.",
                )
    os.replace(part, dest)
    return {"url": url, "path": str(dest), "size": dest.stat().st_size, "sha256": sha256_file(dest)}


# -- reading ----------------------------------------------------------------------------------------------
def _broken_gzip(path: Path, exc: Exception) -> GlossError:
    return GlossError(
        f"{path} is not a complete gzip file ({exc}).",
        "The file is truncated or corrupt: fetch it again (delete it to re-download).",
    )


def read_gz(path: Path) -> bytes:
    """The decompressed bytes, checked to be complete, non-empty UTF-8."""
    try:
        data = gzip.decompress(path.read_bytes())
    except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
        raise _broken_gzip(path, exc) from None
    if not data.strip():
        raise GlossError(f"{path} is empty.", "Fetch the file again, or point gloss at another copy.")
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise GlossError(
            f"{path}, line {line}: bytes that are not UTF-8 ({data[exc.start : exc.start + 1]!r}).",
            "Re-encode the file as UTF-8.",
        ) from None
    return data


@dataclass(frozen=True)
class CsvSchema:
    """A compact-format CSV file: its columns and their polars types. Ids must be non-empty and carry no surrounding
    spaces (" U1" is not "U1"); ``optional`` columns may be empty; an Int64 column holds base-10 integers that fit
    in 64 bits. Other columns are ignored; a UTF-8 byte-order mark is accepted."""

    name: str
    columns: dict[str, Any]
    optional: tuple[str, ...] = ()


INTERACTIONS_CSV = CsvSchema("interactions", {"user_id": pl.String, "item_id": pl.String, "timestamp": pl.Int64})
ITEMS_CSV = CsvSchema("items", {"item_id": pl.String, "title": pl.String}, optional=("title",))
_INTEGER = re.compile(r"\s*[+-]?[0-9]+\s*")  # what polars parses as Int64 (ASCII digits only)
_BOM = b"\xef\xbb\xbf"


def _csv_rows(data: bytes) -> Iterator[tuple[int, list[str]]]:
    reader = csv.reader(io.StringIO(data.decode("utf-8")))
    for row in reader:
        yield reader.line_num, row


def _cell_problem(value: str, column: str, schema: CsvSchema) -> str | None:
    """What is wrong with one cell, or None."""
    if column in schema.optional:
        return None
    if not value.strip():
        return f"empty {column}"
    if schema.columns[column] == pl.Int64:
        if not _INTEGER.fullmatch(value) or not -(2**63) <= int(value) < 2**63:
            return f"{column} '{value[:40]}' is not an integer" + (" of 64 bits" if _INTEGER.fullmatch(value) else "")
    elif value != value.strip():
        return f"{column} '{value[:40]}' has leading or trailing spaces"
    return None


def _first_bad_line(path: Path, data: bytes, header: list[str], schema: CsvSchema) -> None:
    """Raise for the first line that breaks the schema (slow, but only run on files that do)."""
    positions = {col: header.index(col) for col in schema.columns}
    for line, row in _csv_rows(data):
        if line == 1:
            continue
        if len(row) != len(header):
            raise GlossError(
                f"{path}, line {line}: expected {len(header)} fields, found {len(row)}.",
                "Fix or remove that line (titles with commas must be quoted).",
            )
        for col, i in positions.items():
            if problem := _cell_problem(row[i], col, schema):
                raise GlossError(f"{path}, line {line}: {problem}.", "Fix or remove that line.")


def read_csv(path: Path, schema: CsvSchema) -> pl.DataFrame:
    """The file's schema columns, parsed with strict casts; a broken line is named in one GlossError."""
    data = read_gz(path)
    data = data.removeprefix(_BOM)  # Excel and some editors write one; it is not part of the first column's name
    header = next(csv.reader(io.StringIO(data[: data.find(b"\n")].decode("utf-8"))), [])
    missing = [col for col in schema.columns if col not in header]
    if missing:
        raise GlossError(
            f"{path} lacks column(s) {', '.join(missing)} (header: {','.join(header)}).",
            f"The file needs a header line with {','.join(schema.columns)}.",
        )
    try:
        frame = pl.read_csv(
            io.BytesIO(data), schema_overrides=schema.columns, columns=list(schema.columns), infer_schema=False
        )
    except pl.exceptions.PolarsError as exc:
        _first_bad_line(path, data, header, schema)
        raise GlossError(
            f"{path}: cannot be parsed as CSV ({str(exc).splitlines()[0]}).", "Check the file's quoting."
        ) from None
    if frame.height == 0:
        raise GlossError(f"{path} has a header but no rows.", f"Each line after the header is one {schema.name} row.")
    ids = [col for col, kind in schema.columns.items() if kind == pl.String and col not in schema.optional]
    blank = pl.any_horizontal(
        *(pl.col(col).is_null() | (pl.col(col) != pl.col(col).str.strip_chars()) | (pl.col(col) == "") for col in ids)
    )
    required = [col for col in schema.columns if col not in schema.optional]
    if frame.select(required).null_count().sum_horizontal().item() or frame.select(blank.any()).item():
        _first_bad_line(path, data, header, schema)
        raise GlossError(f"{path}: empty or malformed {', '.join(required)} values.", "Fix the file.")
    return frame


def open_file(path: Path) -> io.BufferedIOBase:
    """The file's bytes, gunzipped on the fly when its name ends in .gz."""
    return gzip.open(path) if path.name.endswith(".gz") else path.open("rb")


def _int64_problem(value: Any) -> str | None:
    """What keeps a JSON value from being an Int64 field's value (None: nothing, or it is absent)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        return "is not an integer"
    return None if -(2**63) <= value < 2**63 else "is not an integer of 64 bits"


def _json_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, text) of each non-blank line; a broken gzip, an unreadable file or a line that is not UTF-8 is a
    GlossError."""
    try:
        with open_file(path) as fh:
            for line, raw in enumerate(fh, 1):
                if not raw.strip():
                    continue
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise GlossError(
                        f"{path}, line {line}: bytes that are not UTF-8 ({raw[exc.start : exc.start + 1]!r}).",
                        "Re-encode the file as UTF-8.",
                    ) from None
                yield line, text
    except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
        raise _broken_gzip(path, exc) from None
    except OSError as exc:
        raise GlossError(
            f"{path}: cannot be read ({exc}).", "The file is truncated or corrupt: fetch it again."
        ) from None


def _first_bad_json_line(path: Path, fields: dict[str, Any]) -> None:
    """Raise for the first line that is not a JSON object with integer Int64 fields (slow, but only run on files
    polars refused)."""
    for line, text in _json_lines(path):
        try:
            record = json.loads(text)
        except json.JSONDecodeError as bad:
            raise GlossError(f"{path}, line {line}: not valid JSON ({bad.msg}).", "Fetch the file again.") from None
        if not isinstance(record, dict):
            raise GlossError(f"{path}, line {line}: not a JSON object.", "Fetch the file again.")
        for name, kind in fields.items():
            if kind == pl.Int64 and (problem := _int64_problem(record.get(name))):
                shown = str(record[name])[:40]
                raise GlossError(f"{path}, line {line}: {name} {shown!r} {problem}.", "Fix the line.")


def read_json_fields(path: Path, fields: dict[str, Any], required: tuple[str, ...]) -> pl.DataFrame:
    """Only ``fields`` (name -> polars type) of a JSON-lines file, gzipped or not, in file order. The file is scanned
    lazily with the streaming engine, so the fields gloss does not use (a review's text) never reach memory. A bad
    line, an empty file, or a record without a ``required`` field (a String one: null or empty) is one GlossError."""
    try:
        frame = pl.scan_ndjson(path, schema=fields).collect(engine="streaming")
    except (pl.exceptions.PolarsError, OSError) as exc:
        _first_bad_json_line(path, fields)
        raise GlossError(
            f"{path}: cannot be read as JSON lines ({str(exc).splitlines()[0]}).", "Fetch the file again."
        ) from None
    if frame.height == 0:
        raise GlossError(f"{path} is empty.", "Fetch the file again, or point gloss at another copy.")
    lacking = {
        name: frame.get_column(name).is_null() | (frame.get_column(name) == "")
        if fields[name] == pl.String
        else frame.get_column(name).is_null()
        for name in required
    }
    # A field no record has means the wrong file; one some records lack, a broken record.
    absent = [name for name, missing in lacking.items() if missing.all()]
    if absent:
        raise GlossError(
            f"{path} has no field(s) {', '.join(absent)}.",
            f"Each line needs {', '.join(required)}: is this the right file?",
        )
    for name, missing in lacking.items():
        if missing.any():
            line, _ = next(itertools.islice(_json_lines(path), missing.arg_true()[0], None))  # polars skips blanks
            raise GlossError(
                f"{path}, line {line}: no {name} ({missing.sum():,} of {frame.height:,} records lack one).",
                f"Each line needs {', '.join(required)}: fix or remove that line.",
            )
    return frame


def read_meta(path: Path) -> pl.DataFrame:
    """asin + title from the 2014 meta file, whose lines are Python literals (never ``eval``)."""
    asins: list[str] = []
    titles: list[str | None] = []
    for line, text in enumerate(read_gz(path).decode("utf-8").splitlines(), 1):
        if not text.strip():
            continue
        try:
            record = ast.literal_eval(text)
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            raise GlossError(f"{path}, line {line}: not a Python literal.", "Fetch the file again.") from None
        if not isinstance(record, dict) or not isinstance(record.get("asin"), str):
            raise GlossError(f"{path}, line {line}: a record without an 'asin'.", "Fetch the file again.")
        title = record.get("title")
        asins.append(record["asin"])
        titles.append(title if isinstance(title, str) else None)
    return pl.DataFrame({"item_id": asins, "title": titles}, schema={"item_id": pl.String, "title": pl.String})


def read_source(source: Source) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(interactions[user_id, item_id, timestamp], items[item_id, title]) in source-file order."""
    if source.kind == "amazon2023":
        from gloss_cli import amazon2023

        interactions = amazon2023.read_reviews(source.interactions)
        return interactions, amazon2023.read_meta(source.items, interactions.get_column("item_id"))
    if source.kind == "log":
        from gloss_cli import logs

        interactions, source.notes["time_unit"] = logs.read_log(source.interactions, source.columns)
        return interactions, logs.read_items(source.items, source.columns)
    if source.kind == "compact":
        interactions = read_csv(source.interactions, INTERACTIONS_CSV)
        items = read_csv(source.items, ITEMS_CSV)
    else:
        fields = {"reviewerID": pl.String, "asin": pl.String, "unixReviewTime": pl.Int64}
        reviews = read_json_fields(source.interactions, fields, tuple(fields))
        interactions = reviews.rename({"reviewerID": "user_id", "asin": "item_id", "unixReviewTime": "timestamp"})
        items = read_meta(source.items)
    return interactions, items
