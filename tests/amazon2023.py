"""Small Amazon Reviews 2023 files written by the tests, in the published schema, and the benchmark's splits made the
way the McAuley lab's scripts make them (plain Python, independent of gloss): sort each user's reviews by time
(stable), keep a user-item pair's earliest review, keep the 5-core, then leave the last item out for test and the one
before for validation (``last_out``; ``last_out_w_his`` adds the space-separated items before each row), or cut every
user's reviews at two global times (``timestamp``, ``timestamp_w_his``: train < T1 <= valid < T2 <= test)."""

from __future__ import annotations

import csv
import gzip
import io
import json
import random
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

CATEGORY = "All_Beauty"
Review = tuple[str, str, float, int]  # user_id, parent_asin, rating, timestamp (ms)


Records = list[dict[str, Any]]


def reviews_and_meta(seed: int = 3, users: int = 45, items: int = 14) -> tuple[Records, Records]:
    """Review records (every user >= 6 reviews, some repeated user-item pairs, some same-millisecond pairs) and meta
    records (one item untitled, one with a 40-word title, plus items no one reviewed)."""
    rng = random.Random(seed)
    asins = [f"B0{i:08d}" for i in range(items)]
    reviews: list[dict[str, Any]] = []
    for u in range(users):
        user = f"AG{u:04d}" + "X" * 22  # 28 characters, like the real ids
        t = 1_600_000_000_000 + rng.randrange(10**9)
        for _ in range(rng.randrange(6, 11)):
            t += rng.choice([0, 1, 86_400_000, rng.randrange(10**8)])
            item = rng.choice(asins)
            reviews.append(
                {
                    "rating": float(rng.randrange(1, 6)),
                    "title": "Great",
                    "text": 'Works as described, "quoted" and, with commas.',
                    "images": [],
                    "asin": item + "C",
                    "parent_asin": item,
                    "user_id": user,
                    "timestamp": t,
                    "helpful_vote": rng.randrange(3),
                    "verified_purchase": True,
                }
            )
    rng.shuffle(reviews)  # the raw file is not in time order
    meta = []
    for i, asin in enumerate([*asins, "B0UNREVIEW1", "B0UNREVIEW2"]):
        title = f"Item {i} " + " ".join(f"w{k}" for k in range(40 if i == 3 else 4))
        meta.append(
            {
                "main_category": "All Beauty",
                "title": "" if i == 5 else title,
                "average_rating": 4.1,
                "rating_number": 10,
                "features": ["f"],
                "description": [],
                "price": None,
                "images": [{"large": "https://example.invalid/x.jpg"}],
                "videos": [],
                "store": "S",
                "categories": [],
                "details": {"Brand": "B"},
                "parent_asin": asin,
                "bought_together": None,
            }
        )
    return reviews, meta


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> Path:
    text = "".join(json.dumps(r) + "\n" for r in records).encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(text) if path.name.endswith(".gz") else text)
    return path


T1, T2 = 1628643414042, 1658002729837  # the lab's cut-offs, written out here, not imported from gloss


def five_core(reviews: list[dict[str, Any]], k: int = 5) -> dict[str, list[Review]]:
    """Each user's reviews in time order (stable), a user-item pair's earliest only, then the k-core."""
    by_user: dict[str, list[Review]] = defaultdict(list)
    for r in reviews:
        by_user[r["user_id"]].append((r["user_id"], r["parent_asin"], r["rating"], r["timestamp"]))
    kept: list[Review] = []
    for rows in by_user.values():
        seen: set[str] = set()
        for row in sorted(rows, key=lambda x: x[3]):
            if row[1] not in seen:
                seen.add(row[1])
                kept.append(row)
    while True:  # k-core: drop users and items with < k reviews until none is left to drop
        users, items = Counter(r[0] for r in kept), Counter(r[1] for r in kept)
        smaller = [r for r in kept if users[r[0]] >= k and items[r[1]] >= k]
        if len(smaller) == len(kept):
            break
        kept = smaller
    ordered: dict[str, list[Review]] = defaultdict(list)
    for row in kept:
        ordered[row[0]].append(row)
    return ordered


def benchmark_splits(reviews: list[dict[str, Any]], k: int = 5) -> dict[str, list[tuple[Review, str]]]:
    """The lab's last_out splits: {split: [(review, history)]}, users in first-seen order."""
    splits: dict[str, list[tuple[Review, str]]] = {"train": [], "valid": [], "test": []}
    for rows in five_core(reviews, k).values():
        history = [r[1] for r in rows]
        splits["test"].append((rows[-1], " ".join(history[:-1])))
        splits["valid"].append((rows[-2], " ".join(history[:-2])))
        splits["train"] += [(row, " ".join(history[:i])) for i, row in enumerate(rows[:-2])]
    return splits


def timestamp_splits(reviews: list[dict[str, Any]], k: int = 5) -> dict[str, list[tuple[Review, str]]]:
    """The lab's timestamp splits: every row goes to the split its time falls in, with every earlier item of the
    user as its history."""
    splits: dict[str, list[tuple[Review, str]]] = {"train": [], "valid": [], "test": []}
    for rows in five_core(reviews, k).values():
        for i, row in enumerate(rows):
            split = "test" if row[3] >= T2 else "valid" if row[3] >= T1 else "train"
            splits[split].append((row, " ".join(r[1] for r in rows[:i])))
    return splits


def spread_over_cutoffs(reviews: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The reviews with new times (each user's order kept) that put users on every side of T1 and T2: by user number
    mod 5, only before T1; train, one valid, several test; train and several valid, no test; only from T2 on (so the
    first test row has no history); across both cut-offs at random."""
    rng = random.Random(5)
    by_user: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in sorted(reviews, key=lambda r: r["timestamp"]):
        by_user[r["user_id"]].append(r)
    out = []
    for u, rows in enumerate(by_user.values()):
        n, day = len(rows), 86_400_000
        starts = {
            0: [T1 - (n - i) * day for i in range(n)],
            1: [T1 - 3 * day + i * day for i in range(3)] + [T1 + day] + [T2 + i * day for i in range(n - 4)],
            2: [T1 - 2 * day + i * day for i in range(2)] + [T1 + (i + 1) * day for i in range(n - 2)],
            3: [T2 + i * day for i in range(n)],
            4: sorted(rng.randrange(T1 - 50 * day, T2 + 50 * day) for _ in range(n)),
        }[u % 5]
        out += [r | {"timestamp": t} for r, t in zip(rows, starts, strict=True)]
    return out


def write_benchmark(folder: Path, splits: dict[str, list[tuple[Review, str]]], *, history: bool, header: bool) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for split, rows in splits.items():
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        if header:
            writer.writerow(["user_id", "parent_asin", "rating", "timestamp", *(["history"] if history else [])])
        for (user, item, rating, ts), his in rows:
            writer.writerow([user, item, rating, ts, *([his] if history else [])])
        (folder / f"{CATEGORY}.{split}.csv.gz").write_bytes(gzip.compress(buf.getvalue().encode()))
