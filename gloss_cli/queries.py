"""Query sets for evaluation: generated titles (`gloss generate` JSONL or a GLoSS JSON file) or the LIS baseline.

Each file format is one declared schema (:class:`GlossEntry`, :class:`GeneratedEntry`): a value of the wrong type is
one GlossError line naming the file, the entry and the field, never a traceback and never a silent coercion (a string
where a list belongs is not a list of characters). The entries are then checked against the project's split and
catalog: known user, the split's target, catalog items, enough generated titles, one entry per user.

The history an entry carries (``seen_asins`` / ``history``) must equal the split's: a file whose histories differ
was made from other data (another ``gloss data`` setting), so its numbers would not be this project's. That is an
error, not a warning, which names how many users differ.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import polars as pl
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from gloss_cli.errors import GlossError
from gloss_cli.prompt import item_text

GLOSS_FIELDS = ("reviewer_id", "asin", "seen_asins", "generated_sequences")
GENERATED_FIELDS = ("user_id", "target", "history", "queries")
_TITLE_PREFIX = re.compile(r"^\s*Title:\s*")

Id = Annotated[str, Field(min_length=1)]


class _Schema(BaseModel):
    # strict: no coercion at all (1 is not "1", "abc" is not a list); unknown fields are allowed and ignored.
    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)


class GlossEntry(_Schema):
    """One entry of a GLoSS queries JSON file (a JSON list of these)."""

    reviewer_id: Id
    asin: Id  # the held-out item
    seen_asins: list[Id]  # the history, oldest first
    generated_sequences: Annotated[list[str], Field(min_length=1)]  # best beam first, "Title: ..." or bare


class GeneratedEntry(_Schema):
    """One line of `gloss generate`'s queries.jsonl."""

    user_id: Id
    target: Id
    history: list[Id]
    queries: Annotated[list[str], Field(min_length=1)]
    scores: list[float] | None = None


@dataclass
class QuerySet:
    source: str  # "lis" | "generate/<split>" | "file:<name>"
    users: list[str]
    targets: list[str]
    histories: list[list[str]]
    queries: list[list[str]]  # per user, best beam first; retrieval text is "Title: <generated title>"

    @property
    def per_user(self) -> int:
        return len(self.queries[0]) if self.queries else 0


@dataclass(frozen=True)
class _Row:
    """An entry of either format once it passed its schema."""

    where: str  # "q.json, entry 3 (user U1)"
    user: str
    target: str
    history: tuple[str, ...]
    queries: tuple[str, ...]


def query_text(generated: str) -> str:
    """Retrieval text for a generated title: the catalog's own format, "Title: <title>" (GLoSS's files
    already carry the prefix, gloss's generate strips it: both end up identical)."""
    return item_text(_TITLE_PREFIX.sub("", generated.split("\n", 1)[0]).strip())


def lis_queries(split: pl.DataFrame, titles: dict[str, str]) -> QuerySet:
    """Last-Item-Search: the query is the title of the user's last history item."""
    histories = split.get_column("history").to_list()
    return QuerySet(
        "lis",
        split.get_column("user_id").to_list(),
        split.get_column("target").to_list(),
        histories,
        [[item_text(titles[h[-1]])] if h else [""] for h in histories],
    )


def _json_type(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number", float: "a number"}
    if value is None or value == "":
        return "null" if value is None else "an empty string"
    return names.get(type(value), type(value).__name__)


def schema_error(exc: ValidationError, where: str, fields: tuple[str, ...]) -> GlossError:
    """The first problem of a failed entry as one line: '<where>: <field>: <what> (got <type>)'."""
    errors = exc.errors(include_url=False)
    missing = [str(e["loc"][0]) for e in errors if e["type"] == "missing"]
    hint = f"Each entry is an object with {', '.join(fields)} (see 'gloss eval --help')."
    if missing:
        return GlossError(f"{where}: no field {', '.join(missing)}.", hint)
    first = errors[0]
    if not first["loc"]:  # the entry itself is not an object
        return GlossError(f"{where}: {_json_type(first['input'])}, not an object.", hint)
    field = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in first["loc"]).lstrip(".")
    return GlossError(f"{where}: {field}: {first['msg']} (got {_json_type(first['input'])}).", hint)


def _where(path: Path, label: str, entry: Any, user_key: str) -> str:
    user = entry.get(user_key) if isinstance(entry, dict) else None
    shown = f"{user[:40]}..." if isinstance(user, str) and len(user) > 40 else user
    return f"{path.name}, {label}" + (f" (user {shown})" if isinstance(user, str) and user else "")


def _check_rows(rows: list[_Row], path: Path, split: pl.DataFrame, titles: dict[str, str], n: int) -> list[_Row]:
    """The rows, one per user in file order, checked against the split and the catalog."""
    if n < 1:
        raise GlossError(f"The recipe reads {n} queries per user.", "Use queries=5 (the paper's) or at least 1.")
    split_rows = {r["user_id"]: r for r in split.select("user_id", "target", "history").iter_rows(named=True)}
    kept: dict[str, _Row] = {}
    differ: list[_Row] = []
    for row in rows:
        if row.user not in split_rows:
            raise GlossError(
                f"{row.where}: unknown user for this split.", "Check --split, or that the file is from this dataset."
            )
        for item in (row.target, *row.history):
            if item not in titles:
                raise GlossError(f"{row.where}: unknown item {item}.", "The file is from another dataset or catalog.")
        truth = split_rows[row.user]
        if truth["target"] != row.target:
            raise GlossError(
                f"{row.where}: target {row.target} differs from the split's {truth['target']}.",
                "Check --split (validation vs test).",
            )
        if len(row.queries) < n:
            raise GlossError(
                f"{row.where}: {len(row.queries)} generated sequences, expected {n}.",
                f"Generate {n} sequences per user (--num-return {n}), or use a recipe with queries="
                f"{len(row.queries)} (e.g. --recipe 'paper queries={len(row.queries)}').",
            )
        if row.user in kept:
            if _fields(kept[row.user]) != _fields(row):
                raise GlossError(
                    f"{row.where}: a second, different entry for this user.", "Keep one entry per user in the file."
                )
            continue  # an exact repeat (e.g. a resumed run wrote it twice): one is enough
        if list(row.history) != list(truth["history"]):
            differ.append(row)
        kept[row.user] = row
    if differ:
        raise GlossError(
            f"{path.name}: the history of {len(differ):,} of {len(kept):,} users differs from the split's "
            f"(first: {differ[0].where.removeprefix(path.name + ', ')}).",
            "The file was made from other data: run 'gloss data' with the settings the file was made with "
            "(e.g. --dedup), or generate the queries again.",
        )
    return list(kept.values())


def _fields(row: _Row) -> tuple[str, str, tuple[str, ...], tuple[str, ...]]:
    return row.user, row.target, row.history, row.queries


def _as_queryset(source: str, rows: list[_Row], split: pl.DataFrame, n: int) -> QuerySet:
    # The split's own histories (equal to the file's, checked): seen=excluded and the LIS list read the project's data.
    histories = dict(zip(split.get_column("user_id").to_list(), split.get_column("history").to_list(), strict=True))
    return QuerySet(
        source,
        [r.user for r in rows],
        [r.target for r in rows],
        [list(histories[r.user]) for r in rows],
        [[query_text(q) for q in r.queries[:n]] for r in rows],
    )


def load_gloss_json(path: Path, split: pl.DataFrame, titles: dict[str, str], n: int = 5) -> QuerySet:
    """GLoSS's own format: a JSON list of {reviewer_id, asin, seen_asins, generated_sequences}."""
    text = _read_text(path, "a GLoSS queries file (a JSON list)")
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise GlossError(f"{path} is not JSON ({exc}).", "Pass a GLoSS queries file (a JSON list).") from None
    except RecursionError:
        raise GlossError(f"{path} nests too deeply to be a queries file.", "Pass a GLoSS queries file.") from None
    if not isinstance(doc, list) or not doc:
        raise GlossError(f"{path} is not a non-empty JSON list.", f"Each entry needs {', '.join(GLOSS_FIELDS)}.")
    rows = []
    for i, entry in enumerate(doc, 1):
        where = _where(path, f"entry {i}", entry, "reviewer_id")
        try:
            valid = GlossEntry.model_validate(entry)
        except ValidationError as exc:
            raise schema_error(exc, where, GLOSS_FIELDS) from None
        rows.append(
            _Row(where, valid.reviewer_id, valid.asin, tuple(valid.seen_asins), tuple(valid.generated_sequences))
        )
    return _as_queryset(f"file:{path.name}", _check_rows(rows, path, split, titles, n), split, n)


def read_generated(path: Path) -> list[tuple[str, GeneratedEntry]]:
    """(where, entry) for each line of a `gloss generate` queries.jsonl, each checked against its schema."""
    entries = []
    # split on "\n" alone, as reading the file line by line does: str.splitlines also cuts at U+2028 inside a title
    for i, line in enumerate(_read_text(path, "a 'gloss generate' queries.jsonl").split("\n"), 1):
        if not line.strip():
            continue
        try:
            doc = json.loads(line)
        except (json.JSONDecodeError, RecursionError):
            raise GlossError(f"{path}, line {i}: not JSON.", "Re-run 'gloss generate': it resumes.") from None
        where = _where(path, f"line {i}", doc, "user_id")
        try:
            entries.append((where, GeneratedEntry.model_validate(doc)))
        except ValidationError as exc:
            raise schema_error(exc, where, GENERATED_FIELDS) from None
    return entries


def _read_text(path: Path, what: str) -> str:
    """A queries file's text (a byte-order mark is harmless: accepted), or one GlossError saying why not."""
    hint = f"Pass the path of {what}."
    try:
        return path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise GlossError(f"Queries file {path} does not exist.", hint) from None
    except IsADirectoryError:
        raise GlossError(f"Queries file {path} is a folder.", hint) from None
    except UnicodeDecodeError as exc:
        raise GlossError(f"{path} is not UTF-8 text ({exc.reason}).", hint) from None


def load_generated(path: Path, split: pl.DataFrame, titles: dict[str, str], source: str, n: int = 5) -> QuerySet:
    """`gloss generate` output: JSONL of {user_id, target, history, queries, scores}."""
    entries = read_generated(path)
    if not entries:
        raise GlossError(f"{path} holds no generated queries.", "Run 'gloss generate' first.")
    rows = [_Row(where, e.user_id, e.target, tuple(e.history), tuple(e.queries)) for where, e in entries]
    return _as_queryset(source, _check_rows(rows, path, split, titles, n), split, n)
