"""`gloss data`: a dataset (Amazon 2014 5-core, Amazon Reviews 2023, any interaction log) -> items, per-user
sequences, and train/validation/test examples.

Processing equals GLoSS's, so that numbers are comparable with the paper:

* titles: whitespace collapsed (Python ``str.split`` semantics), first 25 words; untitled items dropped;
  interactions inner-joined with titled items; duplicate reviews kept unless ``dedup``;
* per user, chronological order with ties in source-file order (``ties="file"``; ``"shuffle"``: in a seeded random
  order, see :func:`order_ties`); users with < 3 interactions dropped;
* test = each user's last item; validation = second-to-last item for a 5 % sample of users
  (``random.seed(42); random.sample(sorted(users), int(0.05 * n))``, then those with >= 3 interactions);
* train = third-to-last item for validation users, second-to-last for the others (or every prefix with
  ``train_examples="all-prefixes"``).

With global cut-off times instead (the Amazon 2023 ``timestamp`` benchmarks), each user's examples are their first
items past each cut-off: see :func:`cutoff_splits`.

Everything is columnar polars; the only Python-level steps are the seeded sample over the sorted user ids and, with
``ties="shuffle"``, the hash of each tied row.

Same-day ties are measured (:func:`tie_stats`): Amazon 2014 review times are days, and reviews of one day keep the
original file's order, which is sorted by ASIN, so a target that shares the previous item's day is, far more often
than by chance, the one with the higher ASIN.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl

from gloss_cli.console import Reporter
from gloss_cli.errors import GlossError
from gloss_cli.project import Project, file_entry
from gloss_cli.sources import MAX_RAW_TITLE_WORDS, DatasetInfo, Source, locate, read_source

TITLE_WORDS = 25
MIN_INTERACTIONS = 3
VALIDATION_SHARE = 0.05
VALIDATION_SEED = 42
TRAIN_EXAMPLES = ("last", "all-prefixes")
# Python's str.split() whitespace: Unicode White_Space plus the ASCII separators \x1c-\x1f.
_WHITESPACE = r"[\s\x1c-\x1f]+"
SPLITS = ("train", "validation", "test")
TIE_POLICIES = ("file", "shuffle")
# Same-day neighbour pairs in one item-id order beyond this share (of at least ID_SORT_MIN_PAIRS pairs) mean the order
# inside a day is an id sort: in time order each direction would hold about half.
ID_SORT_SHARE = 0.9
ID_SORT_MIN_PAIRS = 100
ORDER_INDEX_WHY = (
    "timestamps are 0-based order indices (every user's are exactly 0..n-1), not times: which items share a day "
    "is unknown"
)


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
    ties: str = "file",
    seed: int = 0,
    items_path: Path | str = "items",
    validation: str = "sample",
    cutoffs: tuple[int, int] | None = None,
) -> DataTables:
    """``validation``: "sample" (GLoSS's 5 % of users) or "all" (every user: the Amazon 2023 benchmark's);
    ``cutoffs``: split at these two times (:func:`cutoff_splits`) instead of leave-one-out."""
    check_options(train_examples, ties)
    measurable = not order_index_timestamps(interactions)
    if ties == "shuffle" and not measurable:
        raise GlossError(
            f"Cannot shuffle same-day ties: the {ORDER_INDEX_WHY}.",
            "Use --ties file (the file's order is the only order these data have).",
        )
    items = clean_titles(raw_items, items_path)
    if items.height == 0:
        raise GlossError(
            f"{items_path}: no item has a title ({raw_items.height:,} rows, every title empty).",
            "Items without a title are dropped, as GLoSS does: the items file needs item_id,title rows with titles.",
        )
    key = ["user_id", "item_id", "timestamp"]
    inter = (
        interactions.select(key)
        .with_row_index("_order")
        .join(items.select("item_id"), on="item_id", how="semi", maintain_order="left")
    )
    if dedup:
        inter = inter.unique(key, keep="first", maintain_order=True)
    inter = order_ties(inter, ties, seed)
    titled_users = inter.get_column("user_id").unique().to_list()
    validation_users = set(titled_users) if validation == "all" else sample_validation_users(titled_users)

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
    if cutoffs is None:
        splits = leave_one_out(sequences, train_examples)
    else:
        splits = cutoff_splits(sequences, cutoffs, train_examples)
    measured = tie_stats(sequences, cutoffs) if measurable else {"measurable": False, "why": ORDER_INDEX_WHY}
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
        "ties": measured | {"policy": ties, "seed": seed if ties == "shuffle" else None},
    }
    return DataTables(items, sequences.drop("is_validation"), splits, stats)


def check_options(train_examples: str, ties: str) -> None:
    if train_examples not in TRAIN_EXAMPLES:
        raise GlossError(f"Unknown --train-examples '{train_examples}'.", f"Use one of: {', '.join(TRAIN_EXAMPLES)}.")
    if ties not in TIE_POLICIES:
        raise GlossError(f"Unknown --ties '{ties}'.", f"Use one of: {', '.join(TIE_POLICIES)}.")


def leave_one_out(sequences: pl.DataFrame, train_examples: str) -> dict[str, pl.DataFrame]:
    """test, validation and train examples (user_id, history, target) from each user's sequence."""
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
    return splits


def _after_cutoffs(
    sequences: pl.DataFrame, cutoffs: tuple[int, int]
) -> tuple[pl.DataFrame, dict[str, tuple[pl.DataFrame, pl.Expr]]]:
    """``sequences`` with ``before_valid`` / ``before_test`` (how many items precede t1 / t2), and per held-out split
    the users with an example in it and the position of their target (see :func:`cutoff_splits`)."""
    t1, t2 = cutoffs
    times = pl.col("timestamps")
    seq = sequences.with_columns(
        before_valid=times.list.eval(pl.element() < t1).list.sum().cast(pl.Int64),
        before_test=times.list.eval(pl.element() < t2).list.sum().cast(pl.Int64),
    )
    before_valid, before_test = pl.col("before_valid"), pl.col("before_test")
    return seq, {
        "test": (seq.filter((before_test > 0) & (pl.col("n") > before_test)), before_test),
        "validation": (seq.filter((before_valid > 0) & (before_test > before_valid)), before_valid),
    }


def cutoff_splits(sequences: pl.DataFrame, cutoffs: tuple[int, int], train_examples: str) -> dict[str, pl.DataFrame]:
    """One example per user and split from two global times t1 < t2: items before t1 train, items in [t1, t2)
    validate, items from t2 on test. Test: the user's first item from t2 on, its history every earlier item;
    validation: the first item in [t1, t2), its history the items before t1; train: the last item before t1 (every
    item before t1 but the first with ``all-prefixes``). An example needs a non-empty history, so a user with no item
    before a split's first has no example in it; later items of a split are no one's target."""
    seq, held_out = _after_cutoffs(sequences, cutoffs)
    items_seq, before_valid = pl.col("item_ids"), pl.col("before_valid")

    def examples(frame: pl.DataFrame, position: pl.Expr) -> pl.DataFrame:
        return frame.select("user_id", history=items_seq.list.slice(0, position), target=items_seq.list.get(position))

    splits = {split: examples(frame, position) for split, (frame, position) in held_out.items()}
    if train_examples == "last":
        splits["train"] = examples(seq.filter(before_valid > 1), before_valid - 1)
    else:
        prefixes = seq.with_columns(position=pl.int_ranges(1, before_valid)).explode("position")
        splits["train"] = examples(prefixes.drop_nulls("position"), pl.col("position"))
    return splits


def order_index_timestamps(interactions: pl.DataFrame) -> bool:
    """Whether every user's timestamps are exactly 0..n-1: positions (Toys), not times, so no tie can be seen.

    Read on the file's rows, before untitled items are dropped: dropping them leaves gaps in the positions.
    """
    per_user = interactions.group_by("user_id").agg(
        n=pl.len(), lo=pl.col("timestamp").min(), hi=pl.col("timestamp").max(), distinct=pl.col("timestamp").n_unique()
    )
    positions = (pl.col("lo") == 0) & (pl.col("hi") == pl.col("n") - 1) & (pl.col("distinct") == pl.col("n"))
    return per_user.height > 0 and bool(per_user.select(positions.all()).item())


def shuffle_key(seed: int, user: str, timestamp: int, item: str, position: int) -> int:
    """A 64-bit key that orders one user's same-timestamp rows at random, the same on every machine and version.

    blake2b, not polars' ``hash`` (its values may change between polars versions) nor Python's ``hash`` (salted per
    process). ``position`` (the row's place in its tie, in file order) tells exact duplicate reviews apart.
    """
    text = f"{seed}\x1f{user}\x1f{timestamp}\x1f{item}\x1f{position}"
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "big")


def order_ties(inter: pl.DataFrame, ties: str, seed: int) -> pl.DataFrame:
    """``inter`` (user_id, item_id, timestamp, _order) per user by time; rows of one user and timestamp in file order
    (``file``, the paper's) or in the order of :func:`shuffle_key` (``shuffle``). Only the order inside a tie moves."""
    inter = inter.sort("user_id", "timestamp", "_order")
    if ties == "file":
        return inter
    tie = ("user_id", "timestamp")
    inter = inter.with_columns(_position=pl.int_range(pl.len()).over(tie), _tied=pl.len().over(tie) > 1)
    tied = inter.filter("_tied")  # hashed in Python: only these rows need a key
    rows = tied.select("user_id", "timestamp", "item_id", "_position").iter_rows()
    keys = pl.Series("_key", [shuffle_key(seed, *row) for row in rows], dtype=pl.UInt64)
    return (
        pl.concat([inter.filter(~pl.col("_tied")).with_columns(_key=pl.lit(0, pl.UInt64)), tied.with_columns(keys)])
        .sort("user_id", "timestamp", "_key", "_order")
        .drop("_position", "_tied", "_key")
    )


def _target_ties(sequences: pl.DataFrame, position: pl.Expr) -> dict[str, Any]:
    """Of the targets ``back`` places from the end (1: test, 2: validation), how many share the previous item's
    timestamp, and how many of those have a higher item id than it."""
    ts, ids = pl.col("timestamps"), pl.col("item_ids")
    same = ts.list.get(position) == ts.list.get(position - 1)
    above = same & (ids.list.get(position) > ids.list.get(position - 1))
    row = sequences.select(users=pl.len(), same_day=same.sum(), id_above_previous=above.sum()).row(0, named=True)
    share = round(row["same_day"] / row["users"], 4) if row["users"] else None
    return {"users": row["users"], "same_day": row["same_day"], "share": share} | row


def tie_stats(sequences: pl.DataFrame, cutoffs: tuple[int, int] | None = None) -> dict[str, Any]:
    """How many held-out targets share a timestamp with the item before them, and whether the order inside a
    timestamp is an item-id sort (the share of same-timestamp neighbour pairs in ascending id order). ``cutoffs``:
    the targets are those of :func:`cutoff_splits`, else leave-one-out's."""
    flat = sequences.select("user_id", "item_ids", "timestamps").explode("item_ids", "timestamps")
    previous = flat.with_columns(
        prev_item=pl.col("item_ids").shift(1).over("user_id"), prev_ts=pl.col("timestamps").shift(1).over("user_id")
    ).filter(pl.col("prev_ts").is_not_null())
    pairs = previous.select(
        pairs=pl.len(),
        same_day=(pl.col("prev_ts") == pl.col("timestamps")).sum(),
        same_item=((pl.col("prev_ts") == pl.col("timestamps")) & (pl.col("prev_item") == pl.col("item_ids"))).sum(),
        ascending_id=((pl.col("prev_ts") == pl.col("timestamps")) & (pl.col("prev_item") < pl.col("item_ids"))).sum(),
    ).row(0, named=True)
    ordered = pairs["same_day"] - pairs["same_item"]  # a duplicate review has no id order
    n = pl.col("n")
    held_out = (
        _after_cutoffs(sequences, cutoffs)[1]
        if cutoffs is not None
        else {"test": (sequences, n - 1), "validation": (sequences.filter("is_validation"), n - 2)}
    )
    share = pairs["ascending_id"] / ordered if ordered else None
    pairs["ascending_share"] = None if share is None else round(share, 4)
    return {
        "measurable": True,
        "test_targets": _target_ties(*held_out["test"]),
        "validation_targets": _target_ties(*held_out["validation"]),
        "neighbour_pairs": pairs,
        "id_sorted": share is not None and ordered >= ID_SORT_MIN_PAIRS and max(share, 1 - share) > ID_SORT_SHARE,
    }


def tie_policy(record: dict[str, Any] | None) -> str:
    """How a project's same-day ties are ordered, in words, from its data stage record (an old record without the
    policy used the file's order)."""
    params = (record or {}).get("params", {})
    if params.get("ties", "file") == "shuffle":
        return f"same-day ties shuffled (seed {params.get('ties_seed', 0)})"
    measured = (record or {}).get("metrics", {}).get("ties", {})
    if measured.get("measurable") is False:
        return "same-day ties not measurable (timestamps are order indices)"
    if measured.get("id_sorted"):
        share = measured["neighbour_pairs"]["ascending_share"]
        return f"same-day ties in file order ({'ascending' if share > 0.5 else 'descending'} item id)"
    return "same-day ties in file order"


def tie_warning(name: str, ties: dict[str, Any]) -> str | None:
    """A warning when the order inside a day is an id sort (see :func:`tie_stats`), else None."""
    if not ties.get("id_sorted"):
        return None
    pairs, test = ties["neighbour_pairs"], ties["test_targets"]
    direction = "ascending" if pairs["ascending_share"] > 0.5 else "descending"
    share = pairs["ascending_share"] if direction == "ascending" else 1 - pairs["ascending_share"]
    return (
        f"{name}: {share:.1%} of {pairs['same_day'] - pairs['same_item']:,} same-day neighbour pairs are in "
        f"{direction} item-id order, so the order inside a day is an id sort, not time; {test['same_day']:,} of "
        f"{test['users']:,} test targets ({test['share']:.1%}) share the previous item's day "
        "(gloss data --ties shuffle breaks that order)"
    )


def canonical_differences(info: DatasetInfo, stats: dict[str, Any]) -> list[str]:
    return [
        f"{info.name}: {key.replace('_', ' ')} {stats[key]:,} differs from the canonical 5-core {want:,}"
        for key, want in info.canonical.items()
        if stats[key] != want
    ]


def prepare(
    info: DatasetInfo,
    source: Source,
    *,
    dedup: bool,
    train_examples: str,
    ties: str = "file",
    seed: int = 0,
    reporter: Reporter,
) -> DataTables:
    reporter.info(f"reading {source.kind} files from {source.interactions.parent} ({source.origin})")
    published, cut = None, None
    if source.kind == "benchmark":
        from gloss_cli.amazon2023 import cutoffs, read_benchmark

        interactions, raw_items, published = read_benchmark(source)
        cut = cutoffs(source.notes.get("benchmark"))
    else:
        interactions, raw_items = read_source(source)
    reporter.info(f"{interactions.height:,} interactions, {raw_items.height:,} catalog rows")
    tables = build_tables(
        interactions,
        raw_items,
        dedup=dedup,
        train_examples=train_examples,
        ties=ties,
        seed=seed,
        items_path=source.items,
        validation="all" if published is not None else "sample",
        cutoffs=cut,
    )
    if "time_unit" in source.notes:
        tables.stats["time_unit"] = source.notes["time_unit"]
    if published is not None:
        from gloss_cli.amazon2023 import benchmark_warnings, compare_with_published

        tables.stats["benchmark"] = compare_with_published(
            tables.splits, published, train_examples, timestamp=cut is not None
        )
        for message in benchmark_warnings(info.name, tables.stats["benchmark"]):
            reporter.warn(message)
    for message in canonical_differences(info, tables.stats):
        reporter.warn(message + (" (expected with --dedup)" if dedup else ""))
    if warning := tie_warning(info.name, tables.stats["ties"]):
        reporter.warn(warning)
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


def source_params(source: Source, benchmark: str | None) -> dict[str, Any]:
    """What the data stage records of its source. Amazon 2014 keeps the record it always had (so that a project
    made before other datasets existed is not stale)."""
    params: dict[str, Any] = {"kind": source.kind, "origin": source.origin}
    if source.kind == "benchmark":
        params["benchmark"] = benchmark
    if source.kind == "log":
        params["columns"] = source.columns.as_dict()
    return params


def check_family_options(info: DatasetInfo, benchmark: str | None, dedup: bool, ties: str) -> None:
    if benchmark is None or info.family != "amazon2023":
        return  # --benchmark on another dataset: refused by locate
    if dedup:
        raise GlossError(
            "--dedup cannot apply to --benchmark: the benchmark files hold each user-item pair once already.",
            "Drop --dedup.",
        )
    if ties != "file":
        raise GlossError(
            "--ties shuffle cannot apply to --benchmark: the published splits fix each user's order.",
            "Drop --ties, or use the raw reviews (no --benchmark) to shuffle same-time items.",
        )


def run(
    project: Project,
    info: DatasetInfo,
    source_dir: Path | None,
    *,
    dedup: bool = False,
    train_examples: str = "last",
    ties: str = "file",
    seed: int = 0,
    command: str = "gloss data",
    reporter: Reporter | None = None,
    items: Path | None = None,
    columns: str | None = None,
    benchmark: str | None = None,
) -> dict[str, Any]:
    """The `data` stage: resolve the source, build the tables, publish ``data/`` and record it. Returns stats.
    ``items`` and ``columns``: an interaction log's items file and column map; ``benchmark``: an Amazon 2023
    benchmark variant whose published splits gloss takes."""
    reporter = reporter or Reporter()
    check_options(train_examples, ties)
    check_family_options(info, benchmark, dedup, ties)
    project.manifest()  # a broken manifest fails before any download
    source = locate(info, source_dir, reporter, items=items, columns=columns, benchmark=benchmark)
    params = {
        "dataset": info.name,
        "dedup": dedup,
        "train_examples": train_examples,
        "title_words": TITLE_WORDS,
        "min_interactions": MIN_INTERACTIONS,
        "validation_share": 1.0 if benchmark else VALIDATION_SHARE,
        "validation_seed": None if benchmark else VALIDATION_SEED,
        "ties": ties,  # the order inside a user's same-timestamp items: part of what every later stage used
        "ties_seed": seed if ties == "shuffle" else None,
        "source": source_params(source, benchmark),
    }
    with project.run_stage("data", params, command=command, libraries=("polars",)) as stage:
        tables = prepare(
            info, source, dedup=dedup, train_examples=train_examples, ties=ties, seed=seed, reporter=reporter
        )
        write_tables(tables, stage.dir)
        urls = {Path(d["path"]).name: d["url"] for d in source.downloads}
        for role, path in source.files():
            entry = file_entry(path) | {"role": role}
            if path.name in urls:
                entry["url"] = urls[path.name]
            stage.inputs.append(entry)
        stage.metrics = dict(tables.stats)
    return tables.stats
