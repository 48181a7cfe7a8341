"""A plain-Python, loop-by-loop transcription of GLoSS's preprocessing, to check the polars version against."""

from __future__ import annotations

import random
from collections import defaultdict
from typing import Any


def reference_splits(interactions: list[tuple[str, str, int]], items: list[tuple[str, str]]) -> dict[str, Any]:
    titles: dict[str, str] = {}
    for item_id, title in items:
        if title and title.split() and item_id not in titles:
            titles[item_id] = " ".join(title.split()[:25])
    by_user: dict[str, list[tuple[int, int, str]]] = defaultdict(list)
    for order, (user, item, ts) in enumerate(interactions):
        if item in titles:
            by_user[user].append((ts, order, item))
    sequences = {u: [item for _, _, item in sorted(rows)] for u, rows in by_user.items()}
    random.seed(42)
    sampled = random.sample(sorted(by_user), int(0.05 * len(by_user)))
    sequences = {u: s for u, s in sequences.items() if len(s) >= 3}
    validation_users = {u for u in sampled if u in sequences}
    test = {u: (s[:-1], s[-1]) for u, s in sequences.items()}
    validation = {u: (s[:-2], s[-2]) for u, s in sequences.items() if u in validation_users}
    train = {u: (s[:-3], s[-3]) if u in validation_users else (s[:-2], s[-2]) for u, s in sequences.items()}
    return {"titles": titles, "sequences": sequences, "test": test, "validation": validation, "train": train}
