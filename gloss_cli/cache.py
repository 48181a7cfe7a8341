"""Model folders made once under ``$GLOSS_HOME/models/<kind>/<key>/`` and found again by their key (the cached merge
of a LoRA, its CTranslate2 conversion).

A folder is built in a temporary folder beside it, gets a marker file written last that records every file's size
(and what made it), and is renamed into place: a folder is complete or absent, never half-written. Each use checks
the marker and the sizes (not hashes: hashing hundreds of MB on every call would cost what the cache saves); a
folder without its marker, or with a file of another size, is rebuilt with a one-line warning. One process checks
and builds a key at a time (a file lock beside the folder): torchrun's ranks or two commands would otherwise find
each other's folder half-made, and build it twice.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from filelock import FileLock

from gloss_cli.console import Reporter
from gloss_cli.errors import GlossError


def cache_dir(kind: str, what: str) -> Path:
    """``$GLOSS_HOME/models/<kind>``, made if missing; a GlossError naming ``what`` where it cannot be."""
    from gloss_cli.models import gloss_home

    folder = gloss_home() / "models" / kind
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise GlossError(
            f"Cannot write the {what} cache in {folder}: {exc.strerror or exc}.", "Set GLOSS_HOME to a writable folder."
        ) from None
    return folder


def check_folder(folder: Path, marker: str) -> str | None:
    """Why ``folder`` is not a complete cached folder (None: it is one)."""
    path = folder / marker
    if not path.is_file():
        return f"incomplete (no {marker})" if folder.exists() else "missing"
    try:
        files = json.loads(path.read_text(encoding="utf-8"))["files"]
        sizes = {str(name): int(size) for name, size in files.items()}
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError):
        return f"corrupt (unreadable {marker})"
    for name, size in sizes.items():
        file = folder / name
        if not file.is_file() or file.stat().st_size != size:
            return f"corrupt ({name} is missing or not {size:,} bytes)"
    return None


def read_marker(folder: Path, marker: str) -> dict[str, Any]:
    record: dict[str, Any] = json.loads((folder / marker).read_text(encoding="utf-8"))
    return record


def cached_folder(
    folder: Path,
    marker: str,
    record: dict[str, Any],
    build: Callable[[Path], dict[str, Any]],
    *,
    what: str,
    reporter: Reporter,
) -> Path:
    """``folder``, built first where it is missing or damaged: ``build(tmp)`` fills an empty folder and returns
    what to record beside ``record`` in the marker (with the files' sizes)."""
    with FileLock(str(folder.parent / f".{folder.name}.lock")):
        problem = check_folder(folder, marker)
        if problem is None:
            return folder
        if folder.exists():
            reporter.warn(f"the {what} cache {folder} is {problem}; rebuilding it")
            shutil.rmtree(folder, ignore_errors=True)
        _build(folder, marker, record, build, what)
    return folder


def _build(
    folder: Path, marker: str, record: dict[str, Any], build: Callable[[Path], dict[str, Any]], what: str
) -> None:
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    except OSError as exc:
        raise GlossError(
            f"Cannot write the {what} cache in {folder.parent}: {exc.strerror or exc}.",
            "Set GLOSS_HOME to a writable folder.",
        ) from None
    try:
        made = build(tmp)
        files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.is_file()}
        (tmp / marker).write_text(json.dumps(record | made | {"files": files}, indent=2) + "\n", encoding="utf-8")
        try:
            os.replace(tmp, folder)
        except OSError:
            if check_folder(folder, marker) is not None:  # not a concurrent build that finished first: a real failure
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
