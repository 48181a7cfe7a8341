"""`gloss data`: Amazon 2014 5-core -> items, per-user sequences, and train/validation/test examples.

Processing equals GLoSS's, so that numbers are comparable with the paper:

* titles: whitespace collapsed (Python ``str.split`` semantics), first 25 words; untitled items dropped;
  interactions inner-joined with titled items; duplicate reviews kept unless ``dedup``;
* per user, chronological order with ties in source-file order; users with < 3 interactions dropped;
* test = each user's last item; validation = second-to-last item for a 5 % sample of users
  (``random.seed(42); random.sample(sorted(users), int(0.05 * n))``, then those with >= 3 interactions);
* train = third-to-last item for validation users, second-to-last for the others (or every prefix with
  ``train_examples="all-prefixes"``).

Everything is columnar polars; the only Python-level step is the seeded sample over the sorted user ids.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl

from gloss_cli.console import Reporter
from gloss_cli.errors import GlossError
from gloss_cli.project import Project, file_entry
from gloss_cli.sources import MAX_RAW_TITLE_WORDS, DatasetInfo, Source, read_source, resolve_source

TITLE_WORDS = 25
MIN_INTERACTIONS = 3
VALIDATION_SHARE = 0.05
VALIDATION_SEED = 42
TRAIN_EXAMPLES = ("last", "all-prefixes")
# Python's str.split() whitespace: Unicode White_Space plus the ASCII separators \x1c-\x1f.
_WHITESPACE = r"[\s\x1c-\x1f]+"
SPLITS = ("train", "validation", "test")


@dataclass
class DataTables:
    items: pl.DataFrame  # item_id, title
    sequences: pl.DataFrame  # user_id, item_ids, timestamps, n, n_dedup
    splits: dict[str, pl.DataFrame]  # user_id, history (item ids, oldest first), target
    stats: dict[str, Any] = field(default_factory=dict)


def clean_titles(items: pl.DataFrame, path: Path | str = "items") -> pl.DataFrame:
    """item_id, title: whitespace collapsed, cut to 25 words, untitled items dropped, first row per item kept."""
    items = items.with_row_index("_row").with_columns(
        pl.col("title").fill_null("").str.replace_all(_WHITESPACE, " ").str.strip_chars(" ")
    )
    words = pl.col("title").str.count_matches(" ") + 1
    too_long = items.filter(words > MAX_RAW_TITLE_WORDS).head(1)
    if too_long.height:
        row = too_long.row(0, named=True)
        raise GlossError(
            f"{path}: item {row['item_id']} (row {row['_row'] + 1}) has a title of "
            f"{row['title'].count(' ') + 1:,} words, more than {MAX_RAW_TITLE_WORDS:,}; the file looks corrupt.",
            "Check the file's quoting (an unclosed quote swallows the rows after it).",
        )
    return (
        items.filter(pl.col("title") != "")
        .with_columns(pl.col("title").str.split(" ").list.head(TITLE_WORDS).list.join(" "))
        .unique("item_id", keep="first", maintain_order=True)
        .select("item_id", "title")
    )


def sample_validation_users(user_ids: list[str]) -> set[str]:
    """GLoSS's sample, bit for bit: random.seed(42); random.sample(sorted ids, int(0.05 * n))."""
    ordered = sorted(user_ids)
    return set(random.Random(VALIDATION_SEED).sample(ordered, int(VALIDATION_SHARE * len(ordered))))


def build_tables(
    interactions: pl.DataFrame,
    raw_items: pl.DataFrame,
    *,
    dedup: bool = False,
    train_examples: str = "last",
    items_path: Path | str = "items",
) -> DataTables:
    if train_examples not in TRAIN_EXAMPLES:
        raise GlossError(f"Unknown --train-examples '{train_examples}'.", f"Use one of: {', '.join(TRAIN_EXAMPLES)}.")
    items = clean_titles(raw_items, items_path)
    if items.height == 0:
        raise GlossError(
            f"{items_path}: no item has a title ({raw_items.height:,} rows, every title empty).",
            "Items without a title are dropped, as GLoSS does: the items file needs item_id,title rows with titles.",
        )
    key = ["user_id", "item_id", "timestamp"]
    inter = interactions.select(key).with_row_index("_order").join(items.select("item_id"), on="item_id", how="semi")
    if dedup:
        inter = inter.unique(key, keep="first", maintain_order=True)
    inter = inter.sort("user_id", "timestamp", "_order")
    titled_users = inter.get_column("user_id").unique().to_list()
    validation_users = sample_validation_users(titled_users)

    # The paper's user segments count interactions with exact duplicates removed.
    n_dedup = inter.unique(key).group_by("user_id").agg(n_dedup=pl.len())
    sequences = (
        inter.group_by("user_id", maintain_order=True)
        .agg(item_ids=pl.col("item_id"), timestamps=pl.col("timestamp"))
        .with_columns(n=pl.col("item_ids").list.len())
        .filter(pl.col("n") >= MIN_INTERACTIONS)
        .join(n_dedup, on="user_id", how="left")
        .with_columns(is_validation=pl.col("user_id").is_in(list(validation_users)))
    )
    if sequences.height == 0:
        raise GlossError(
            f"No user has {MIN_INTERACTIONS} or more interactions with titled items "
            f"({interactions.height:,} interactions, {items.height:,} titled items).",
            "Check that the interactions' item_id values are the items file's.",
        )
    items_seq, n = pl.col("item_ids"), pl.col("n")
    splits = {
        "test": sequences.select("user_id", history=items_seq.list.slice(0, n - 1), target=items_seq.list.last()),
        "validation": sequences.filter("is_validation").select(
            "user_id", history=items_seq.list.slice(0, n - 2), target=items_seq.list.get(n - 2)
        ),
    }
    held_out = pl.when(pl.col("is_validation")).then(2).otherwise(1)
    if train_examples == "last":
        position = n - held_out - 1
        splits["train"] = sequences.select(
            "user_id", history=items_seq.list.slice(0, position), target=items_seq.list.get(position)
        )
    else:
        splits["train"] = (
            sequences.with_columns(position=pl.int_ranges(1, n - held_out))
            .explode("position")
            .drop_nulls("position")
            .select(
                "user_id",
                history=items_seq.list.slice(0, pl.col("position")),
                target=items_seq.list.get(pl.col("position")),
            )
        )
    kept = sequences.get_column("n")
    stats = {
        "users": sequences.height,
        "items": items.height,
        "interactions": int(kept.sum()),
        "seq_len_mean": round(float(kept.mean()), 4),  # type: ignore[arg-type]
        "seq_len_std": round(float(kept.std()), 4),  # type: ignore[arg-type]
        "seq_len_max": int(kept.max()),  # type: ignore[arg-type]
        "train_examples": splits["train"].height,
        "validation_users": splits["validation"].height,
        "test_users": splits["test"].height,
        "dropped_untitled_items": raw_items.get_column("item_id").n_unique() - items.height,
        "dropped_interactions": interactions.height - int(kept.sum()),
    }
    return DataTables(items, sequences.drop("is_validation"), splits, stats)


def canonical_differences(info: DatasetInfo, stats: dict[str, Any]) -> list[str]:
    return [
        f"{info.name}: {key.replace('_', ' ')} {stats[key]:,} differs from the canonical 5-core {want:,}"
        for key, want in info.canonical.items()
        if stats[key] != want
    ]


def prepare(info: DatasetInfo, source: Source, *, dedup: bool, train_examples: str, reporter: Reporter) -> DataTables:
    reporter.info(f"reading {source.kind} files from {source.interactions.parent} ({source.origin})")
    interactions, raw_items = read_source(source)
    reporter.info(f"{interactions.height:,} interactions, {raw_items.height:,} catalog rows")
    tables = build_tables(interactions, raw_items, dedup=dedup, train_examples=train_examples, items_path=source.items)
    for message in canonical_differences(info, tables.stats):
        reporter.warn(message + (" (expected with --dedup)" if dedup else ""))
    return tables


def write_tables(tables: DataTables, folder: Path) -> None:
    tables.items.write_parquet(folder / "items.parquet")
    tables.sequences.write_parquet(folder / "sequences.parquet")
    for name in SPLITS:
        tables.splits[name].write_parquet(folder / f"{name}.parquet")
    (folder / "stats.json").write_text(json.dumps(tables.stats, indent=2) + "\n", encoding="utf-8")


def load_items(folder: Path) -> pl.DataFrame:
    return pl.read_parquet(folder / "items.parquet")


def load_split(folder: Path, split: str) -> pl.DataFrame:
    if split not in SPLITS:
        raise GlossError(f"Unknown split '{split}'.", f"Use one of: {', '.join(SPLITS)}.")
    return pl.read_parquet(folder / f"{split}.parquet")


def run(
    project: Project,
    info: DatasetInfo,
    source_dir: Path | None,
    *,
    dedup: bool = False,
    train_examples: str = "last",
    command: str = "gloss data",
    reporter: Reporter | None = None,
) -> dict[str, Any]:
    """The `data` stage: resolve the source, build the tables, publish ``data/`` and record it. Returns stats."""
    reporter = reporter or Reporter()
    if train_examples not in TRAIN_EXAMPLES:
        raise GlossError(f"Unknown --train-examples '{train_examples}'.", f"Use one of: {', '.join(TRAIN_EXAMPLES)}.")
    project.manifest()  # a broken manifest fails before any download
    source = resolve_source(info, source_dir, reporter)
    params = {
        "dataset": info.name,
        "dedup": dedup,
        "train_examples": train_examples,
        "title_words": TITLE_WORDS,
        "min_interactions": MIN_INTERACTIONS,
        "validation_share": VALIDATION_SHARE,
        "validation_seed": VALIDATION_SEED,
        "source": {"kind": source.kind, "origin": source.origin},
    }
    with project.run_stage("data", params, command=command, libraries=("polars",)) as stage:
        tables = prepare(info, source, dedup=dedup, train_examples=train_examples, reporter=reporter)
        write_tables(tables, stage.dir)
        urls = {Path(d["path"]).name: d["url"] for d in source.downloads}
        for role, path in (("interactions", source.interactions), ("items", source.items)):
            entry = file_entry(path) | {"role": role}
            if path.name in urls:
                entry["url"] = urls[path.name]
            stage.inputs.append(entry)
        stage.metrics = dict(tables.stats)
    return tables.stats
