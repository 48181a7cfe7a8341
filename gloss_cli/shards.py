"""Sharded work: ``torchrun --nproc-per-node N -m gloss_cli generate|rerank ...`` splits the users over N processes.

One process works through its users in batches, longest prompt first. N processes deal those same batches round
robin: process r takes batches r, r + N, r + 2N, ... Whole batches, so that each one is computed exactly as one
process computes it (the same prompts padded to the same length give the same beams and scores, to the bit); round
robin, because the batches come longest first and each process then gets long and short ones alike (their loads
differ by at most one batch), where contiguous blocks would give process 0 all the longest prompts.

Generation writes each process's lines to ``parts/part-<rank>-of-<N>.jsonl`` in the stage's folder, appended and
fsynced batch by batch like ``queries.jsonl``; ``parts/plan.json`` keeps the one-process order and batch size. When
every process is done, rank 0 merges the parts into ``queries.jsonl`` in that order (the bytes one process writes)
and removes ``parts/``. A resumed run reads every part there, whatever N wrote it, so it can use another N: no
user is lost or generated twice, and a batch a kill cut short is generated again whole (its missing users written).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from gloss_cli.distributed import World
from gloss_cli.errors import GlossError
from gloss_cli.project import atomic_file, atomic_write_text

T = TypeVar("T")
PARTS = "parts"
PLAN = "plan.json"
_PART = re.compile(r"part-(\d+)-of-(\d+)\.jsonl")


def length_batches(prompts: Sequence[str], size: int) -> list[list[int]]:
    """Indices of ``prompts`` in batches of ``size``, longest prompt first (ties in their order): the batches one
    process runs. The largest batch comes first, so a too-large batch size fails at once."""
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    return [order[start : start + size] for start in range(0, len(order), size)]


def share(batches: Sequence[T], here: World) -> list[T]:
    """This process's batches: every N-th one, from its rank on (the module's docstring says why)."""
    return list(batches[here.rank :: here.size])


def part_path(folder: Path, here: World) -> Path:
    return folder / PARTS / f"part-{here.rank}-of-{here.size}.jsonl"


def part_files(folder: Path) -> list[Path]:
    """The part files in ``folder/parts``, by world size, then rank."""
    found = [(m, p) for p in (folder / PARTS).glob("part-*.jsonl") if (m := _PART.fullmatch(p.name))]
    return [p for m, p in sorted(found, key=lambda x: (int(x[0][2]), int(x[0][1])))]


def read_lines(path: Path) -> dict[str, bytes]:
    """Each user's line in a queries file (``queries.jsonl`` or a part), in file order. A partial last line (a run
    killed mid-write) is cut off the file."""
    if not path.is_file():
        return {}
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        os.truncate(path, end)
    lines: dict[str, bytes] = {}
    for n, line in enumerate(data[:end].splitlines(keepends=True), 1):
        if not line.strip():
            continue
        try:
            user = json.loads(line)["user_id"]
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
            raise GlossError(
                f"{path}, line {n} is not a queries record.", "Delete the file, or pass --overwrite."
            ) from None
        lines.setdefault(str(user), line)
    return lines


def read_all(sources: Iterable[Path]) -> dict[str, bytes]:
    """Every user's line in ``sources``; a user found twice keeps its first line (both are the same bytes: a user is
    generated once, unless a run was killed after its merge wrote queries.jsonl and before the parts went)."""
    lines: dict[str, bytes] = {}
    for path in sources:
        for user, line in read_lines(path).items():
            lines.setdefault(user, line)
    return lines


def read_plan(folder: Path) -> dict[str, Any]:
    """``parts/plan.json`` ({} when there is none, or it cannot be read: the merge then keeps the split's order)."""
    path = folder / PARTS / PLAN
    try:
        plan = json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return plan if isinstance(plan, dict) else {}


def batch_size(folder: Path) -> int:
    """The batch size the plan records (0: none)."""
    size = read_plan(folder).get("batch_size")
    return size if isinstance(size, int) and size > 0 else 0


def write_plan(folder: Path, order: Sequence[str], batch_size: int, world_size: int) -> None:
    """The one-process order of the users and the batch size (a resumed run with an automatic batch size keeps it,
    so that the batches a kill cut short are made again the same)."""
    plan = {"batch_size": batch_size, "world_size": world_size, "order": list(order)}
    atomic_write_text(folder / PARTS / PLAN, json.dumps(plan) + "\n")


def merge(folder: Path, target: Path, wanted: Sequence[str]) -> int:
    """``target`` rewritten from itself and every part, then ``parts/`` removed. Every user of ``wanted`` must be
    there. The order: the plan's (one process's), then ``wanted``'s, then as found. Returns the lines written."""
    lines = read_all([target, *part_files(folder)])
    missing = [user for user in wanted if user not in lines]
    if missing:  # the processes all said they were done: a part was removed or cut under them
        raise GlossError(
            f"{len(missing)} user(s) are in no part of {folder / PARTS}: {', '.join(missing[:3])}.",
            "Run the same command again: it generates the users that are missing.",
        )
    planned = read_plan(folder).get("order")
    planned = [user for user in planned if isinstance(user, str)] if isinstance(planned, list) else []
    order = [user for user in dict.fromkeys([*planned, *wanted, *lines]) if user in lines]
    with atomic_file(target) as fh:
        for user in order:
            fh.write(lines[user])
    shutil.rmtree(folder / PARTS)
    return len(order)
