"""Same-day ties (issue 19): measured exactly, ordered by a recorded policy, and split on by `gloss segments`.

The dataset below is built so that every count is known: each user has 5 reviews on days that follow one of four
patterns, and the file lists a day's reviews in ascending item id (as Amazon 2014's files do) or at random.
"""

from __future__ import annotations

import json
import random
import shlex
from pathlib import Path

import polars as pl
import pytest
from typer.testing import CliRunner

from gloss_cli.cli import app
from gloss_cli.data import build_tables, sample_validation_users, shuffle_key, tie_policy
from gloss_cli.project import Project
from gloss_cli.sources import Source, read_source
from tests.conftest import synthetic_rows, write_gz_csv
from tests.reference import reference_splits

runner = CliRunner()
LIS = "lis-top1-kept-allusers-bm25"  # the run name of gloss eval --recipe "lis-paper users=all", less its split


@pytest.fixture(autouse=True)
def wide_tables(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tables as wide as their text, so that a phrase checked below is never wrapped across lines."""
    from gloss_cli.console import out

    monkeypatch.setattr(out, "_width", 400)


DAY = 86_400
USERS = 200
# days of each user's 5 reviews, by user number % 4: (test target tied, validation target tied, tied neighbour pairs)
PATTERNS = [[1, 2, 3, 4, 4], [1, 1, 2, 3, 4], [1, 2, 3, 3, 3], [1, 2, 3, 4, 5]]
PATTERN_TIES = [(True, False, 1), (False, False, 1), (True, True, 2), (False, False, 0)]


def tied_rows(*, id_sorted: bool, seed: int = 0) -> list[list[object]]:
    """user_id, item_id, timestamp rows; a day's rows in ascending item id (``id_sorted``) or at random. Users are
    interleaved in the file, as in a review dump."""
    rng = random.Random(seed)
    rows: list[list[object]] = []
    for u in range(USERS):
        items = rng.sample(range(40), 5)
        days = PATTERNS[u % 4]
        user_rows = [[f"U{u:03d}", f"I{i:03d}", 1_400_000_000 + d * DAY] for i, d in zip(items, days, strict=True)]
        user_rows.sort(key=lambda r: (r[2], r[1]) if id_sorted else (r[2], rng.random()))
        rows += user_rows
    return interleave(rows, rng)


def interleave(rows: list[list[object]], rng: random.Random) -> list[list[object]]:
    """The rows in a random order that keeps each user's own order (so ties keep theirs)."""
    by_user: dict[object, list[list[object]]] = {}
    for row in rows:
        by_user.setdefault(row[0], []).append(row)
    queues = list(by_user.values())
    out: list[list[object]] = []
    while queues:
        queue = rng.choice(queues)
        out.append(queue.pop(0))
        if not queue:
            queues.remove(queue)
    return out


def write_source(folder: Path, rows: list[list[object]]) -> Path:
    write_gz_csv(folder / "interactions.csv.gz", ["user_id", "item_id", "timestamp"], rows)
    write_gz_csv(folder / "items.csv.gz", ["item_id", "title"], [[f"I{i:03d}", f"Item {i} thing"] for i in range(40)])
    return folder


def cli(*args: str, code: int = 0) -> dict:  # type: ignore[type-arg]
    result = runner.invoke(app, list(args))
    assert result.exit_code == code, result.output
    return json.loads(result.stdout) if code == 0 and "--json" in args else {}


def refused(args: list[str], message: str) -> None:
    result = runner.invoke(app, args)
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert message in lines[-2] and lines[-1].startswith("hint: "), result.stderr


def expected_ties() -> dict[str, int]:
    validation = sample_validation_users([f"U{u:03d}" for u in range(USERS)])
    return {
        "test": sum(PATTERN_TIES[u % 4][0] for u in range(USERS)),
        "validation": sum(PATTERN_TIES[u % 4][1] for u in range(USERS) if f"U{u:03d}" in validation),
        "validation_users": len(validation),
        "pairs": sum(PATTERN_TIES[u % 4][2] for u in range(USERS)),
    }


def tables(folder: Path, **kwargs):  # type: ignore[no-untyped-def]
    inter, items = read_source(Source("compact", "test", folder / "interactions.csv.gz", folder / "items.csv.gz"))
    return build_tables(inter, items, **kwargs)


def sequences(t) -> dict[str, tuple[list[str], list[int]]]:  # type: ignore[no-untyped-def]
    return {r["user_id"]: (r["item_ids"], r["timestamps"]) for r in t.sequences.iter_rows(named=True)}


# -- measuring ------------------------------------------------------------------------------------------------
def test_tie_counts_are_exact_and_an_id_sorted_file_is_flagged(tmp_path: Path) -> None:
    src = write_source(tmp_path / "sorted", tied_rows(id_sorted=True))
    doc = cli("data", "--source", str(src), "-p", "p", "--json")
    ties, want = doc["stats"]["ties"], expected_ties()
    assert ties["measurable"] is True and ties["policy"] == "file" and ties["seed"] is None
    assert ties["test_targets"] == {"users": USERS, "same_day": want["test"], "share": 0.5, "id_above_previous": 100}
    val = ties["validation_targets"]
    assert (val["users"], val["same_day"]) == (want["validation_users"], want["validation"])
    assert val["id_above_previous"] == want["validation"] > 0
    pairs = ties["neighbour_pairs"]
    assert pairs == {
        "pairs": USERS * 4,
        "same_day": want["pairs"],
        "same_item": 0,
        "ascending_id": want["pairs"],
        "ascending_share": 1.0,
    }
    assert ties["id_sorted"] is True
    assert any("same-day neighbour pairs are in ascending item-id order" in w for w in doc["warnings"])
    # the same object in stats.json and in the manifest's record of the data stage
    assert json.loads(Path("p/data/stats.json").read_text())["ties"] == ties
    record = Project("p").stage("data")
    assert record is not None and record["metrics"]["ties"] == ties
    assert (record["params"]["ties"], record["params"]["ties_seed"]) == ("file", None)
    table = runner.invoke(app, ["data", "--source", str(src), "-p", "p"])
    assert "test targets on the previous" in table.stdout and "an id sort" in table.stdout


def test_ties_in_random_order_are_not_flagged(tmp_path: Path) -> None:
    shuffled_file = write_source(tmp_path / "random", tied_rows(id_sorted=False))
    for source, extra in (
        (shuffled_file, []),
        (write_source(tmp_path / "sorted", tied_rows(id_sorted=True)), ["--ties", "shuffle"]),
    ):
        doc = cli("data", "--source", str(source), "-p", "p", "--json", *extra)
        ties = doc["stats"]["ties"]
        assert ties["id_sorted"] is False and not any("item-id order" in w for w in doc["warnings"])
        assert 0.35 < ties["neighbour_pairs"]["ascending_share"] < 0.65
        assert ties["test_targets"]["same_day"] == expected_ties()["test"]  # which targets tie never depends on order


# -- the shuffle policy ---------------------------------------------------------------------------------------
def test_shuffle_is_seeded_and_moves_only_the_order_inside_ties(tmp_path: Path) -> None:
    src = write_source(tmp_path / "sorted", tied_rows(id_sorted=True))
    file = sequences(tables(src))
    first, again, other = (sequences(tables(src, ties="shuffle", seed=s)) for s in (0, 0, 1))
    assert first == again and first != other and first != file
    for shuffled in (first, other):
        assert shuffled.keys() == file.keys()
        for user, (items, days) in file.items():
            got_items, got_days = shuffled[user]
            assert got_days == days  # the day order is untouched
            for day in set(days):  # each day keeps its items; only their order may differ
                assert sorted(i for i, d in zip(got_items, got_days, strict=True) if d == day) == sorted(
                    i for i, d in zip(items, days, strict=True) if d == day
                )
    # a stable hash: the same key on every machine and polars version
    assert shuffle_key(0, "U000", 1_400_000_000, "I001", 0) == 0x2CDA3811E25DDCF2


def test_file_policy_is_todays_output_exactly(synthetic: Path) -> None:
    inter, items = synthetic_rows()
    ref = reference_splits([(u, i, int(t)) for u, i, t in inter], [(i, str(t)) for i, t in items])
    default, file = tables(synthetic), tables(synthetic, ties="file")
    assert {u: s[0] for u, s in sequences(file).items()} == ref["sequences"]
    assert file.sequences.equals(default.sequences)
    for split in ("train", "validation", "test"):
        assert file.splits[split].equals(default.splits[split])
    # duplicates and ties of the conftest data survive a shuffle as the same multiset per user
    shuffled = sequences(tables(synthetic, ties="shuffle", seed=5))
    assert {u: sorted(s[0]) for u, s in shuffled.items()} == {u: sorted(s) for u, s in ref["sequences"].items()}


def test_the_policy_is_a_data_param_and_named_by_eval(tmp_path: Path) -> None:
    src = write_source(tmp_path / "sorted", tied_rows(id_sorted=True))
    cli("data", "--source", str(src), "-p", "p", "-q")
    doc = cli("eval", "--recipe", "lis-paper users=all", "-p", "p", "-q", "--json")
    assert "same-day ties in file order (ascending item id)" in doc["protocol_description"]
    before = Project("p").stage("data")
    cli("data", "--source", str(src), "-p", "p", "-q", "--ties", "shuffle", "--seed", "3")
    after = Project("p").stage("data")
    assert before is not None and after is not None
    assert (after["params"]["ties"], after["params"]["ties_seed"]) == ("shuffle", 3)
    assert after["fingerprint"] != before["fingerprint"]
    states = {s.name: s.state for s in Project("p").status()}
    assert states["eval/lis-top1-kept-allusers-bm25-test"] == "stale"  # made from the file-order data
    assert after["invocation"] == shlex.join(
        ["gloss", "data", "--source", str(src), "--ties", "shuffle", "--seed", "3"]
    )
    doc = cli("eval", "--recipe", "lis-paper users=all", "-p", "p", "-q", "--json")
    assert "same-day ties shuffled (seed 3)" in doc["protocol_description"]
    assert (
        "same-day ties shuffled (seed 3)"
        in json.loads(Path(doc["folder"], "metrics.json").read_text())["protocol_description"]
    )
    table = runner.invoke(app, ["eval", "--recipe", "transitions seen=kept users=all", "-p", "p"])
    assert table.exit_code == 0 and "same-day ties shuffled (seed 3)" in table.stdout
    # a record from before --ties used the file's order
    assert tie_policy({"params": {"dataset": "beauty"}, "metrics": {}}) == "same-day ties in file order"
    refused(["data", "--source", str(src), "-p", "p", "--ties", "random"], "Unknown --ties 'random'")


# -- order-index timestamps (Toys) ----------------------------------------------------------------------------
def test_order_index_timestamps_are_unmeasurable_and_refuse_a_shuffle(tmp_path: Path) -> None:
    rng = random.Random(1)
    rows = [[f"U{u:03d}", f"I{i:03d}", pos] for u in range(60) for pos, i in enumerate(rng.sample(range(40), 6))]
    src = write_source(tmp_path / "toys", rows)
    items = [[f"I{i:03d}", "" if i == 7 else f"Item {i}"] for i in range(40)]  # an untitled item leaves gaps
    write_gz_csv(src / "items.csv.gz", ["item_id", "title"], items)
    doc = cli("data", "-d", "toys", "--source", str(src), "-p", "p", "--json", "-q")
    ties = doc["stats"]["ties"]
    assert ties["measurable"] is False and "order indices" in ties["why"] and "test_targets" not in ties
    table = runner.invoke(app, ["data", "-d", "toys", "--source", str(src), "-p", "p"])
    assert "timestamps are order indices" in table.stdout and "%" not in table.stdout.split("same-day ties")[-1]
    before = Path("p/manifest.json").read_text()
    refused(["data", "-d", "toys", "--source", str(src), "-p", "p", "--ties", "shuffle"], "Cannot shuffle same-day")
    assert Path("p/manifest.json").read_text() == before
    doc = cli("eval", "--recipe", "lis-paper users=all", "-p", "p", "-q", "--json")
    assert "same-day ties not measurable" in doc["protocol_description"]
    refused(["segments", "--by", "ties", "-p", "p"], "Cannot split toys users by same-day ties")


# -- segments --by ties ---------------------------------------------------------------------------------------
def test_segments_by_ties_add_up_and_match_the_stats(tmp_path: Path) -> None:
    src = write_source(tmp_path / "sorted", tied_rows(id_sorted=True))
    stats = cli("data", "--source", str(src), "-p", "p", "--json", "-q")["stats"]["ties"]
    cli("eval", "--recipe", "lis-paper users=all", "-p", "p", "-q")
    cli("eval", "--recipe", "lis-paper users=all", "--split", "validation", "-p", "p", "-q")
    doc = cli("segments", "--by", "ties", "-p", "p", "--json", "-q")
    assert doc["by"] == "ties" and doc["cold"] is None
    users = {(r["run"], r["segment"]): r["users"] for r in doc["segments"]}
    for run, split in ((f"{LIS}-test", "test_targets"), (f"{LIS}-validation", "validation_targets")):
        assert users[run, "same-day"] == stats[split]["same_day"]
        assert users[run, "same-day"] + users[run, "later day"] == stats[split]["users"]
    per_user = pl.read_parquet(f"p/eval/{LIS}-test/per_user.parquet")
    row = next(r for r in doc["segments"] if r["run"] == f"{LIS}-test" and r["segment"] == "same-day")
    tied = {f"U{u:03d}" for u in range(USERS) if PATTERN_TIES[u % 4][0]}
    assert row["recall@5"] == pytest.approx(per_user.filter(pl.col("user_id").is_in(tied))["recall@5"].mean())
    assert Path(doc["plot"]).read_bytes()[:4] == b"\x89PNG"
    record = Project("p").stage("segments")
    assert record is not None and record["params"]["by"] == "ties" and "--by ties" in record["invocation"]
    table = runner.invoke(app, ["segments", "--by", "ties", "-p", "p"])
    assert table.exit_code == 0 and "same-day" in table.stdout and "later day" in table.stdout
    assert "in file order (ascending item id)" in table.stdout
    refused(["segments", "--by", "ties", "--cold", "3", "-p", "p"], "--cold and --power split users by interactions")
    refused(["segments", "--by", "days", "-p", "p"], "Unknown --by 'days'")
    default = cli("segments", "-p", "p", "--json", "-q")  # the interaction split stays the default
    assert default["by"] == "interactions" and {r["segment"] for r in default["segments"]} == {
        "cold-start",
        "regular",
        "power",
    }
