"""Bounds checked before any work: the machine's free memory, and what the project's data allows.

A command whose memory grows with an option estimates it first and refuses with the figure, rather than being
killed by the kernel half way (``gloss eval -k 100000`` was: 19.5 GB).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from gloss_cli.errors import GlossError


def available_memory() -> int | None:
    """Bytes that new allocations can take without swapping: /proc/meminfo's MemAvailable (which counts reclaimable
    caches), else the free physical pages; None where neither is known."""
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def size_text(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:,.1f} {unit}" if unit != "B" else f"{n:,.0f} B"
        n /= 1024
    return f"{n:,.1f} TiB"


def require_memory(need: int, what: str, hint: str) -> None:
    """Refuse ``what`` when its estimated ``need`` (bytes) exceeds the memory available now."""
    have = available_memory()
    if have is not None and need > have:
        raise GlossError(f"{what} needs about {size_text(need)} of memory; {size_text(have)} is available.", hint)


def data_stats(project_root: Path) -> dict[str, Any] | None:
    """The data stage's stats.json (items, users per split), or None before 'gloss data' (its own error comes
    later, from the stage)."""
    try:
        stats = json.loads((project_root / "data" / "stats.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return stats if isinstance(stats, dict) else None


def require_k_within_catalog(ks: list[int], items: int, option: str = "-k") -> None:
    """A cut-off past the catalog's size ranks every item and says nothing more: it is a mistake."""
    if max(ks) > items:
        sep = "" if option.endswith("=") else " "  # a recipe's key (candidates=) or an option (-k)
        raise GlossError(
            f"{option}{sep}{max(ks):,} is more than the catalog's {items:,} items.",
            f"Pass {option}{sep}{items} or less.",
        )


def retrieval_bytes(queries: int, depth: int, items: int) -> int:
    """Memory of a retrieval's results: per query ``depth`` (at most the catalog) int64 keys and float32 scores,
    three times over (the retriever's arrays, the copies that merging makes, the lists it builds). Measured on Beauty,
    LIS at -k 12000 with the history excluded: 8.6 GiB resident for an estimate of 9.1 GiB."""
    return 3 * queries * min(depth, items) * (8 + 4)


def check_retrieval(root: Path, split: str, cutoff: int, *, queries: int, depth: int | None, option: str) -> None:
    """Before retrieving for every user of ``split``: ``cutoff`` (the value of ``option``) within the catalog, and
    ``queries`` per user x ``depth`` results each (None: no retrieval) within the free memory. The data stage's
    stats give the sizes; before 'gloss data' this checks nothing (the stage itself says what to run)."""
    stats = data_stats(root)
    if stats is None or not isinstance(stats.get("items"), int):
        return
    require_k_within_catalog([cutoff], stats["items"], option)
    users = stats.get(f"{split}_users")
    if depth is None or not isinstance(users, int):
        return  # no retrieval, or a split that the stage refuses
    require_memory(
        retrieval_bytes(users * queries, depth, stats["items"]),
        f"Retrieving the top {cutoff:,} items for {users:,} users x {queries} quer{'y' if queries == 1 else 'ies'}",
        f"Pass a smaller {option} or a recipe with fewer queries (--recipe ... queries=N), or use a machine with "
        "more free memory.",
    )
