"""Amazon Reviews 2023 (McAuley lab, https://amazon-reviews-2023.github.io/): ``--dataset amazon2023/<Category>``.

Two ways in, both with the category's meta file (``meta_<Category>.jsonl``: ``parent_asin``, ``title``, ...) for
titles:

* **raw reviews** (default): ``<Category>.jsonl`` (one review per line: ``user_id``, ``parent_asin``, ``timestamp`` in
  ms, ``rating``, ``text``, ...), processed as GLoSS processes Amazon 2014 (titles cut to 25 words, untitled items
  dropped, users with >= 3 interactions, leave-one-out, a 5 % validation sample). Items are ``parent_asin``; the
  catalogue is the meta file's items that have a review. Unlike the 2023 benchmark, no 5-core filter is applied and
  duplicate user-item reviews are kept (``--dedup`` drops exact duplicates only); the benchmark drops repeated
  user-item reviews, keeping the earliest, then keeps the 5-core.
* **the official benchmark splits** (``--benchmark last_out`` or ``last_out_w_his``):
  ``<Category>.{train,valid,test}.csv`` (``user_id,parent_asin,rating,timestamp[,history]``; ``history`` is the
  space-separated ``parent_asin``s before the row, in the ``_w_his`` variant), deduplicated and 5-core filtered by the
  McAuley lab. gloss's test item per user is the file's test row, its validation item the valid row (for every user:
  the benchmark has no 5 % sample), its train example the user's last train row (``--train-examples all-prefixes``:
  every train row with a history). gloss checks that this holds and records how many rows equal the published ones:
  all of them, unless items without a title had to be dropped (GLoSS's processing), which gloss then warns about.
* **the absolute-time splits** (``--benchmark timestamp`` or ``timestamp_w_his``): the same files, cut at two global
  times for every category (``benchmark_scripts/timestamp_split.py``: a review before t1 = 1628643414042 ms trains,
  one in [t1, t2 = 1658002729837) validates, one from t2 on tests). A user has 0, 1 or several valid and test rows.
  The lab's own sequential-recommendation evaluation (``seq_rec_results/``: RecBole on the ``timestamp_w_his`` rows)
  scores **every** valid and test row as its own example, the history being every earlier item of the user (earlier
  test items included), and drops rows without a history. gloss holds one target per user and split, so it scores a
  subset of those examples, each exactly as the lab builds it: a user's **first** valid row (history: the user's
  train items) and **first** test row (history: every train and valid item), each only where that history is not
  empty; its train example is the user's last train row with a history (``all-prefixes``: every such train row). A
  user with no test row gets no test example, one with no train row no validation example, one only in train only a
  train example. The data stage records per split how many published rows there are, how many gloss's rule takes
  (``scored``) and equals, how many are later rows of a user (``later_rows``: scored by the lab, not by gloss) and how
  many have no history (``no_history``: scored by neither), and ``gloss data`` warns that the subset is scored.
  Metrics are therefore per user (each user once, at their first held-out item), not per row as in the lab's tables;
  the lab also uses the 0-core files and cuts histories to 50 items, gloss the 5-core and its own history length.

Files are looked for, gzipped or not, in ``--source DIR`` (or ``DIR/<Category>``; split files also in
``DIR/<variant>/``), then in ``$GLOSS_DATA_DIR/amazon2023/<Category>/``, else downloaded (resumable, sha256 recorded)
from the lab's server (``$GLOSS_AMAZON2023_URL`` overrides it): ``raw/review_categories/<Category>.jsonl.gz``,
``raw/meta_categories/meta_<Category>.jsonl.gz`` and ``benchmark/5core/<variant>/<Category>.<split>.csv.gz``. The
split files are read with or without their header line. JSON lines are scanned lazily, reading only the fields
gloss uses (a review's text never reaches memory), with polars' streaming engine.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import polars as pl

from gloss_cli.errors import GlossError
from gloss_cli.sources import DatasetInfo, Source, download, gloss_home, open_file, read_json_fields

if TYPE_CHECKING:
    from gloss_cli.console import Reporter

PREFIX = "amazon2023/"
AMAZON_2023_URL = "https://mcauleylab.ucsd.edu/public_datasets/data/amazon_2023/"
# The 33 categories with their exact file-name spellings, and "Unknown" (reviews the lab could not place).
CATEGORIES = (
    "All_Beauty",
    "Amazon_Fashion",
    "Appliances",
    "Arts_Crafts_and_Sewing",
    "Automotive",
    "Baby_Products",
    "Beauty_and_Personal_Care",
    "Books",
    "CDs_and_Vinyl",
    "Cell_Phones_and_Accessories",
    "Clothing_Shoes_and_Jewelry",
    "Digital_Music",
    "Electronics",
    "Gift_Cards",
    "Grocery_and_Gourmet_Food",
    "Handmade_Products",
    "Health_and_Household",
    "Health_and_Personal_Care",
    "Home_and_Kitchen",
    "Industrial_and_Scientific",
    "Kindle_Store",
    "Magazine_Subscriptions",
    "Movies_and_TV",
    "Musical_Instruments",
    "Office_Products",
    "Patio_Lawn_and_Garden",
    "Pet_Supplies",
    "Software",
    "Sports_and_Outdoors",
    "Subscription_Boxes",
    "Tools_and_Home_Improvement",
    "Toys_and_Games",
    "Video_Games",
    "Unknown",
)
BENCHMARKS = ("last_out", "last_out_w_his", "timestamp", "timestamp_w_his")
# The global cut-offs (ms) of the timestamp variants, the same for every category (benchmark_scripts/timestamp_split.py
# in hyp1231/AmazonReviews2023): train < T1 <= valid < T2 <= test.
TIMESTAMP_CUTOFFS = (1628643414042, 1658002729837)
SPLIT_FILES = ("train", "valid", "test")
BENCHMARK_COLUMNS = ("user_id", "parent_asin", "rating", "timestamp", "history")
REVIEW_FIELDS = {"user_id": pl.String, "parent_asin": pl.String, "timestamp": pl.Int64}
META_FIELDS = {"parent_asin": pl.String, "title": pl.String}


def dataset(name: str) -> DatasetInfo:
    """The DatasetInfo of ``amazon2023/<Category>`` (the category matched without case, kept in its spelling)."""
    wanted = name[len(PREFIX) :]
    found = next((c for c in CATEGORIES if c.lower() == wanted.lower()), None)
    if found is None:
        raise GlossError(
            f"Unknown Amazon 2023 category '{wanted}'.",
            f"Use one of: {', '.join(CATEGORIES)} (e.g. 'gloss data --dataset amazon2023/All_Beauty').",
        )
    return DatasetInfo(PREFIX + found, found, family="amazon2023")


def check_benchmark(benchmark: str) -> None:
    if benchmark not in BENCHMARKS:
        raise GlossError(f"Unknown --benchmark '{benchmark}'.", f"Use one of: {', '.join(BENCHMARKS)}.")


def cutoffs(benchmark: str | None) -> tuple[int, int] | None:
    """The (t1, t2) cut-offs of a timestamp variant; None for the leave-one-out ones (and the raw reviews)."""
    return TIMESTAMP_CUTOFFS if benchmark is not None and benchmark.startswith("timestamp") else None


def _find(folder: Path, name: str) -> Path | None:
    return next((p for p in (folder / name, folder / (name + ".gz")) if p.is_file()), None)


def _in_dir(folder: Path, info: DatasetInfo, benchmark: str | None, origin: str) -> Source | None:
    cat = info.category
    meta = _find(folder, f"meta_{cat}.jsonl")
    if meta is None:
        return None
    if benchmark is None:
        reviews = _find(folder, f"{cat}.jsonl")
        return Source("amazon2023", origin, reviews, meta) if reviews else None
    for where in (folder / benchmark, folder):
        splits = {split: _find(where, f"{cat}.{split}.csv") for split in SPLIT_FILES}
        if all(splits.values()):
            found = {k: v for k, v in splits.items() if v is not None}
            return Source("benchmark", origin, found["train"], meta, splits=found, notes={"benchmark": benchmark})
    return None


def expected(info: DatasetInfo, benchmark: str | None) -> str:
    cat = info.category
    first = f"{cat}.jsonl[.gz]" if benchmark is None else f"{cat}.{{train,valid,test}}.csv[.gz]"
    return f"{first} + meta_{cat}.jsonl[.gz]"


def resolve(info: DatasetInfo, source: Path | None, benchmark: str | None, reporter: Reporter) -> Source:
    if source is not None:
        for folder in (source, source / info.category):
            if folder.is_dir() and (found := _in_dir(folder, info, benchmark, "--source")):
                return found
        raise GlossError(
            f"--source {source} holds no {info.name} data (expected {expected(info, benchmark)}).",
            "Point --source at the folder with those files.",
        )
    mirror = os.environ.get("GLOSS_DATA_DIR")
    if mirror:
        folder = Path(mirror).expanduser() / "amazon2023" / info.category
        if found := _in_dir(folder, info, benchmark, "GLOSS_DATA_DIR"):
            return found
        raise GlossError(
            f"GLOSS_DATA_DIR={mirror} has no amazon2023/{info.category}/ folder with {expected(info, benchmark)}.",
            "Fix GLOSS_DATA_DIR, or unset it to download the files.",
        )
    return download_files(info, benchmark, reporter)


def download_files(info: DatasetInfo, benchmark: str | None, reporter: Reporter) -> Source:
    base = os.environ.get("GLOSS_AMAZON2023_URL", AMAZON_2023_URL).rstrip("/") + "/"
    folder = gloss_home() / "downloads" / "amazon2023" / info.category
    cat = info.category
    names = {"items": f"raw/meta_categories/meta_{cat}.jsonl.gz"}
    if benchmark is None:
        names["interactions"] = f"raw/review_categories/{cat}.jsonl.gz"
    else:
        names |= {split: f"benchmark/5core/{benchmark}/{cat}.{split}.csv.gz" for split in SPLIT_FILES}
    records = {role: download(base + name, folder / name, reporter) for role, name in names.items()}
    paths = {role: Path(record["path"]) for role, record in records.items()}
    downloads = list(records.values())
    if benchmark is None:
        return Source("amazon2023", "download", paths["interactions"], paths["items"], downloads)
    splits = {split: paths[split] for split in SPLIT_FILES}
    notes = {"benchmark": benchmark}
    return Source("benchmark", "download", splits["train"], paths["items"], downloads, splits=splits, notes=notes)


# -- reading ----------------------------------------------------------------------------------------------
def read_reviews(path: Path) -> pl.DataFrame:
    """interactions[user_id, item_id (parent_asin), timestamp (ms)] in file order."""
    frame = read_json_fields(path, REVIEW_FIELDS, tuple(REVIEW_FIELDS))
    return frame.rename({"parent_asin": "item_id"})


def read_meta(path: Path, items: pl.Series | None = None) -> pl.DataFrame:
    """items[item_id (parent_asin), title]; only the ``items`` given (those with interactions) when given."""
    frame = read_json_fields(path, META_FIELDS, ("parent_asin",)).rename({"parent_asin": "item_id"})
    if items is not None:
        frame = frame.join(pl.DataFrame({"item_id": items.unique()}), on="item_id", how="semi", maintain_order="left")
    return frame


def _has_header(path: Path) -> tuple[bool, int]:
    """Whether the split file starts with a header line, and how many fields its first line has."""
    try:
        with open_file(path) as fh:
            first = fh.readline().decode("utf-8")
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        raise GlossError(
            f"{path}: cannot be read ({exc}).", "The file is truncated or corrupt: fetch it again."
        ) from None
    if not first.strip():
        raise GlossError(f"{path} is empty.", "Fetch the file again.")
    fields = first.rstrip("\r\n").split(",")
    return fields[0] == "user_id", len(fields)


def read_split(path: Path) -> pl.DataFrame:
    """A benchmark split file -> user_id, item_id, timestamp (Int64), history (list of item ids, or null)."""
    header, width = _has_header(path)
    if width not in (4, 5):
        raise GlossError(
            f"{path}: {width} fields on its first line; a benchmark split has 4 or 5 ({','.join(BENCHMARK_COLUMNS)}).",
            f"Is this a file of benchmark/5core/<variant> ({', '.join(BENCHMARKS)})?",
        )
    names = list(BENCHMARK_COLUMNS[:width])
    try:
        frame = (
            pl.scan_csv(path, has_header=header, new_columns=names, infer_schema=False)
            .select(names)
            .collect(engine="streaming")
        )
    except (pl.exceptions.PolarsError, OSError) as exc:
        raise GlossError(
            f"{path}: cannot be read as CSV ({str(exc).splitlines()[0]}).", "Fetch the file again."
        ) from None
    line0 = 2 if header else 1
    for name in ("user_id", "parent_asin", "timestamp"):
        if (bad := frame.get_column(name).is_null()).any():
            raise GlossError(f"{path}, line {bad.arg_true()[0] + line0}: empty {name}.", "Fetch the file again.")
    times = frame.get_column("timestamp").str.strip_chars().cast(pl.Int64, strict=False)
    if (bad := times.is_null()).any():
        line = bad.arg_true()[0]
        raise GlossError(
            f"{path}, line {line + line0}: timestamp '{frame.get_column('timestamp')[line]}' is not an integer.",
            "Fetch the file again.",
        )
    history = pl.col("history").str.split(" ") if "history" in names else pl.lit(None, pl.List(pl.String))
    return frame.select("user_id", item_id="parent_asin", timestamp=times, history=history)


def read_benchmark(source: Source) -> tuple[pl.DataFrame, pl.DataFrame, dict[str, pl.DataFrame]]:
    """(interactions in the benchmark's order: each user's train rows, then the valid row(s), then the test row(s);
    meta items of the split files; the published splits by name). A timestamp variant's rows must lie on their
    side of the cut-offs."""
    published = {split: read_split(path) for split, path in source.splits.items()}
    if cut := cutoffs(source.notes.get("benchmark")):
        _check_cutoffs(source, published, cut)
    interactions = pl.concat([published[split].select("user_id", "item_id", "timestamp") for split in SPLIT_FILES])
    items = read_meta(source.items, interactions.get_column("item_id"))
    return interactions, items, published


def _check_cutoffs(source: Source, published: dict[str, pl.DataFrame], cut: tuple[int, int]) -> None:
    t1, t2 = cut
    ranges = {
        "train": (-(2**63), t1, f"before {t1}"),
        "valid": (t1, t2, f"in [{t1}, {t2})"),
        "test": (t2, 2**63 - 1, f"from {t2} on"),
    }
    for split, (lo, hi, where) in ranges.items():
        times = published[split].get_column("timestamp")
        if (outside := (times < lo) | (times >= hi)).any():
            row = outside.arg_true()[0]
            raise GlossError(
                f"{source.splits[split]}, row {row + 1}: timestamp {times[row]} is not {where}, where the lab's "
                f"timestamp benchmark puts its {split} rows.",
                "Is this a file of benchmark/5core/timestamp or timestamp_w_his?",
            )


def _published_train(train: pl.DataFrame, train_examples: str) -> pl.DataFrame:
    """The train examples the published train rows make: every row but each user's first, which has no history
    ("all-prefixes"), or of those each user's last ("last")."""
    with_history = train.filter(pl.int_range(pl.len()).over("user_id") > 0)
    if train_examples == "last":
        return with_history.group_by("user_id", maintain_order=True).last()
    return with_history


def _first_rows(file: pl.DataFrame, earlier: pl.DataFrame) -> tuple[pl.DataFrame, dict[str, int]]:
    """A timestamp split's rows that gloss scores: each user's first row, where the user has an earlier row (in the
    ``earlier`` files), and the counts of the rows it leaves out."""
    first = file.group_by("user_id", maintain_order=True).first()
    scored = first.join(earlier.select("user_id").unique(), on="user_id", how="semi", maintain_order="left")
    counts = {"later_rows": file.height - first.height, "no_history": first.height - scored.height}
    return scored, counts


def compare_with_published(
    splits: dict[str, pl.DataFrame], published: dict[str, pl.DataFrame], train_examples: str, *, timestamp: bool = False
) -> dict[str, Any]:
    """How many of the benchmark's rows gloss's examples equal: the user, the target and, where the file has one (the
    ``_w_his`` variant), the history. Train: see :func:`_published_train`. ``timestamp``: the valid and test rows
    gloss's rule takes are each user's first with a history (:func:`_first_rows`); ``published`` then counts every
    row of the file, ``scored`` those the rule takes."""
    counts: dict[str, Any] = {}
    earlier = {"valid": published["train"], "test": pl.concat([published["train"], published["valid"]])}
    for ours, theirs in (("test", "test"), ("validation", "valid"), ("train", "train")):
        file = published[theirs].rename({"item_id": "target"})
        extra: dict[str, int] = {}
        if ours == "train":
            rows = _published_train(file, train_examples)
        elif timestamp:
            rows, extra = _first_rows(file, earlier[theirs])
        else:
            rows = file
        with_history = (
            file.get_column("history").dtype != pl.Null and file.get_column("history").null_count() < file.height
        )
        # histories compared as text; an empty one is read as null
        as_text = pl.col("history").list.join(" ").fill_null("")
        keys = ["user_id", "target", *(["history"] if with_history else [])]
        mine = splits[ours].with_columns(as_text).select(keys)
        equal = mine.join(rows.with_columns(as_text).select(keys), on=keys, how="semi").height
        if timestamp:
            counts[ours] = {"published": file.height, "scored": rows.height, "equal": equal} | extra
        else:
            counts[ours] = {"published": rows.height, "equal": equal}
        counts[ours]["history_compared"] = with_history
    return counts


def benchmark_warnings(name: str, counts: dict[str, Any]) -> list[str]:
    """A line per split whose rows gloss takes differ from the published ones, and for a timestamp variant the line
    that says which published rows gloss does not score."""
    lines = [
        f"{name}: {c.get('scored', c['published']) - c['equal']:,} of {c.get('scored', c['published']):,} published "
        f"{split} rows {'gloss scores ' if 'scored' in c else ''}differ from gloss's "
        "(rows with untitled items were dropped, as GLoSS drops them)"
        for split, c in counts.items()
        if c["equal"] != c.get("scored", c["published"])
    ]
    if "later_rows" in counts["test"]:
        test, valid = counts["test"], counts["validation"]
        lines.append(
            f"{name}: gloss scores each user's first test and first valid row only; the lab's evaluation scores every "
            f"row: {test['later_rows']:,} of {test['published']:,} test and {valid['later_rows']:,} of "
            f"{valid['published']:,} valid rows (users' later rows) are not scored "
            f"({test['no_history'] + valid['no_history']:,} more have no history: scored by neither)"
        )
    return lines
