"""Query sets for evaluation: generated titles (`gloss generate` JSONL or a GLoSS JSON file) or the LIS baseline.

Every loader validates against the project's split and catalog and turns a problem into one GlossError line.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl

from gloss_cli.errors import GlossError
from gloss_cli.prompt import item_text

GLOSS_FIELDS = ("reviewer_id", "asin", "seen_asins", "generated_sequences")
_TITLE_PREFIX = re.compile(r"^\s*Title:\s*")


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


def _check_rows(rows: list[dict[str, Any]], path: Path, split: pl.DataFrame, titles: dict[str, str], n: int) -> None:
    targets = dict(zip(split.get_column("user_id").to_list(), split.get_column("target").to_list(), strict=True))
    for i, row in enumerate(rows, 1):
        missing = [key for key in ("user_id", "target", "history", "queries") if key not in row]
        if missing:
            raise GlossError(f"{path.name}, entry {i}: no field {', '.join(missing)}.", "Re-run 'gloss generate'.")
        user, target = row["user_id"], row["target"]
        where = f"{path.name}, entry {i} (user {user})"
        if user not in targets:
            raise GlossError(
                f"{where}: unknown user for this split.", "Check --split, or that the file is from this dataset."
            )
        for item in [target, *row["history"]]:
            if item not in titles:
                raise GlossError(f"{where}: unknown item {item}.", "The file is from another dataset or catalog.")
        if targets[user] != target:
            raise GlossError(
                f"{where}: target {target} differs from the split's {targets[user]}.",
                "Check --split (validation vs test).",
            )
        if len(row["queries"]) < n or not all(isinstance(q, str) for q in row["queries"]):
            raise GlossError(
                f"{where}: {len(row['queries'])} generated sequences, expected {n}.",
                f"Generate {n} sequences per user (--num-return {n}), or pass --num-queries.",
            )


def _as_queryset(source: str, rows: list[dict[str, Any]], n: int) -> QuerySet:
    seen: set[str] = set()
    unique = [r for r in rows if not (r["user_id"] in seen or seen.add(r["user_id"]))]  # type: ignore[func-returns-value]
    return QuerySet(
        source,
        [r["user_id"] for r in unique],
        [r["target"] for r in unique],
        [list(r["history"]) for r in unique],
        [[query_text(q) for q in r["queries"][:n]] for r in unique],
    )


def load_gloss_json(path: Path, split: pl.DataFrame, titles: dict[str, str], n: int = 5) -> QuerySet:
    """GLoSS's own format: a JSON list of {reviewer_id, asin, seen_asins, generated_sequences}."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise GlossError(f"Queries file {path} does not exist.", "Pass the path of a GLoSS JSON file.") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise GlossError(f"{path} is not JSON ({exc}).", "Pass a GLoSS queries file (a JSON list).") from None
    if not isinstance(doc, list) or not doc:
        raise GlossError(f"{path} is not a non-empty JSON list.", f"Each entry needs {', '.join(GLOSS_FIELDS)}.")
    rows = []
    for i, entry in enumerate(doc, 1):
        missing = [f for f in GLOSS_FIELDS if not isinstance(entry, dict) or f not in entry]
        if missing:
            raise GlossError(
                f"{path.name}, entry {i}: no field {', '.join(missing)}.",
                f"Each entry needs {', '.join(GLOSS_FIELDS)}.",
            )
        rows.append(
            {
                "user_id": entry["reviewer_id"],
                "target": entry["asin"],
                "history": entry["seen_asins"],
                "queries": entry["generated_sequences"],
            }
        )
    _check_rows(rows, path, split, titles, n)
    return _as_queryset(f"file:{path.name}", rows, n)


def load_generated(path: Path, split: pl.DataFrame, titles: dict[str, str], source: str, n: int = 5) -> QuerySet:
    """`gloss generate` output: JSONL of {user_id, target, history, queries, scores}."""
    rows = []
    with path.open(encoding="utf-8") as fh:
        for i, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                raise GlossError(f"{path}, line {i}: not JSON.", "Re-run 'gloss generate': it resumes.") from None
    if not rows:
        raise GlossError(f"{path} holds no generated queries.", "Run 'gloss generate' first.")
    _check_rows(rows, path, split, titles, n)
    return _as_queryset(source, rows, n)
