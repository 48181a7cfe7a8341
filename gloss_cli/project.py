"""The project directory: ``manifest.json``, one folder per stage, and a lock against concurrent writers.

The manifest is the memory of a project. Each stage records its parameters, inputs and outputs (paths relative to
the project, sizes, sha256 of small files), library versions, timings, its metrics and the fingerprints of the
upstream stages it used. A stage whose upstream fingerprint changed, or whose outputs changed on disk, is stale.

Stages write into a temporary folder inside the project and are published with renames, so a failed or
interrupted stage leaves neither partial output nor a changed manifest.
"""

from __future__ import annotations

import contextlib
import getpass
import hashlib
import json
import os
import platform
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from gloss_cli import __version__
from gloss_cli.errors import GlossError

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
LOCK = ".gloss.lock"
DEFAULT_PROJECT = "gloss-project"
HASH_LIMIT = 64 * 2**20  # files up to this size get a sha256 in the manifest; larger ones only a size


@dataclass(frozen=True)
class Stage:
    name: str
    upstream: tuple[str, ...]
    command: str  # how to (re)run it; {dataset} is filled from the project when known


# Pipeline order. A stage is listed here once its command exists.
PIPELINE: tuple[Stage, ...] = (
    Stage("data", (), "gloss data --dataset {dataset}"),
    Stage("train", ("data",), "gloss train --dataset {dataset}"),
    Stage("index", ("data",), "gloss index --retriever bm25"),
    Stage("generate", ("data", "train"), "gloss generate --split test"),
    Stage("eval", ("data",), "gloss eval --baseline lis"),
    Stage("segments", ("data",), "gloss segments"),
)
# Stages that status lists when they have run and never asks for: (stage, the pipeline stage it comes before).
OPTIONAL: tuple[tuple[Stage, str], ...] = (
    (Stage("rerank", ("data", "train", "generate"), "gloss rerank --split validation"), "eval"),
)


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def sha256_file(path: Path, chunk: int = 2**20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def file_entry(path: Path, base: Path | None = None) -> dict[str, Any]:
    """Path (relative to ``base`` when inside it), size, and sha256 for files under HASH_LIMIT."""
    size = path.stat().st_size
    shown = str(path.relative_to(base)) if base is not None and path.is_relative_to(base) else str(path)
    entry: dict[str, Any] = {"path": shown, "size": size}
    if size <= HASH_LIMIT:
        entry["sha256"] = sha256_file(path)
    return entry


def library_versions(*names: str) -> dict[str, str]:
    versions = {"gloss": __version__, "python": platform.python_version()}
    for name in names:
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[name] = metadata.version(name)
    return versions


def fingerprint(document: Any) -> str:
    return hashlib.sha256(json.dumps(document, sort_keys=True, default=str).encode()).hexdigest()[:16]


@contextlib.contextmanager
def atomic_file(path: Path, mode: str = "wb") -> Iterator[Any]:
    """A file to write ``path`` with: a temp file in the same folder (with a plainly created file's permissions, not
    mkstemp's owner-only ones), fsynced and renamed over ``path`` when the block ends. Readers see the old file or
    the new one, never half; if the block raises, the temp file goes and ``path`` is as it was."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, encoding=None if "b" in mode else "utf-8") as fh:
            umask = os.umask(0)
            os.umask(umask)
            os.fchmod(fh.fileno(), 0o666 & ~umask)
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """``path`` replaced by ``text`` at once (:func:`atomic_file`)."""
    with atomic_file(path, "w") as fh:
        fh.write(text)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# Old manifests are upgraded in memory, one schema step at a time: {from_version: upgrade}.
MIGRATIONS: dict[int, Callable[[dict[str, Any]], dict[str, Any]]] = {}


@dataclass
class StageRun:
    """A stage in progress: write outputs under ``dir``; add inputs, metrics and params as they become known."""

    name: str
    dir: Path
    params: dict[str, Any]
    inputs: list[dict[str, Any]] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)
    libraries: tuple[str, ...] = ()


@dataclass(frozen=True)
class StageState:
    name: str
    state: str  # "done" | "stale" | "missing"
    reason: str
    command: str
    finished: str | None = None


class Project:
    def __init__(self, root: Path | str) -> None:
        self.root = Path(root).expanduser().absolute()

    @property
    def manifest_path(self) -> Path:
        return self.root / MANIFEST

    def exists(self) -> bool:
        return self.manifest_path.is_file()

    # -- manifest -----------------------------------------------------------------------------------------
    def manifest(self) -> dict[str, Any]:
        if not self.exists():
            return {"schema_version": SCHEMA_VERSION, "gloss_version": __version__, "stages": {}}
        try:
            doc = json.loads(self.manifest_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise GlossError(
                f"{self.manifest_path} is not valid JSON ({exc}).",
                "Restore it from a backup, or start a fresh project with --project NEW_DIR.",
            ) from exc
        version = doc.get("schema_version") if isinstance(doc, dict) else None
        if not isinstance(version, int) or not isinstance(doc.get("stages"), dict):
            raise GlossError(
                f"{self.manifest_path} is not a gloss manifest.",
                "Point --project at a gloss project folder, or at a new folder.",
            )
        if version > SCHEMA_VERSION:
            raise GlossError(
                f"{self.manifest_path} has schema {version}; this gloss reads up to {SCHEMA_VERSION}.",
                "Upgrade gloss: pip install -U gloss",
            )
        while version < SCHEMA_VERSION:
            doc = MIGRATIONS[version](doc)
            version = doc["schema_version"]
        return doc

    def stage(self, name: str) -> dict[str, Any] | None:
        record = self.manifest()["stages"].get(name)
        return record if isinstance(record, dict) else None

    def require(self, name: str, command: str | None = None) -> dict[str, Any]:
        """The record of a finished stage, or a GlossError saying what to run first."""
        record = self.stage(name)
        if record is None:
            hint = command or next((s.command for s in PIPELINE if s.name == name), f"gloss {name}")
            raise GlossError(
                f"Stage '{name}' has not run in project {self.root}.",
                f"Run '{hint.format(dataset='beauty')}' first (or pass --project).",
            )
        return record

    def path(self, relative: str) -> Path:
        return self.root / relative

    # -- lock ---------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def lock(self, command: str) -> Iterator[None]:
        """Refuse a second writer. A lock left by a dead process on this host is taken over."""
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / LOCK
        me = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "user": getpass.getuser(),
            "since": now_iso(),
            "command": command,
        }
        while True:
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                try:
                    holder = json.loads(path.read_text(encoding="utf-8"))
                except (OSError, json.JSONDecodeError):
                    holder = {}
                pid = holder.get("pid")
                if holder.get("host") == me["host"] and isinstance(pid, int) and not _pid_alive(pid):
                    path.unlink(missing_ok=True)  # its writer died without cleaning up
                    continue
                raise GlossError(
                    f"Project {self.root} is locked by '{holder.get('command', '?')}' "
                    f"(pid {pid}, user {holder.get('user', '?')} on {holder.get('host', '?')}, "
                    f"since {holder.get('since', '?')}).",
                    f"Wait for it to finish; if that process is gone, delete {path}.",
                ) from None
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump(me, fh)
            break
        try:
            yield
        finally:
            path.unlink(missing_ok=True)

    # -- running a stage ----------------------------------------------------------------------------------
    def _upstream(self, manifest: dict[str, Any], name: str, upstream: tuple[str, ...] | None) -> dict[str, str]:
        """Fingerprints of the stage records this one uses (default: its PIPELINE family's upstream stages)."""
        if upstream is None:
            spec = next((s for s in PIPELINE if s.name == name.split("/")[0]), None)
            upstream = spec.upstream if spec else ()
        fingerprints = {}
        for up in upstream:
            record = manifest["stages"].get(up)
            if record is None:
                self.require(up)
            fingerprints[up] = record["fingerprint"]
        return fingerprints

    @contextlib.contextmanager
    def run_stage(
        self,
        name: str,
        params: dict[str, Any],
        *,
        command: str,
        libraries: tuple[str, ...] = (),
        out_dir: str | None = None,
        upstream: tuple[str, ...] | None = None,
        in_place: bool = False,
    ) -> Iterator[StageRun]:
        """Run a stage and record it in the manifest under ``name`` (e.g. ``data``, ``index/bm25``).

        By default the stage writes into a temp folder that replaces ``<out_dir or name>/`` on success; on any
        exception the temp folder is removed and neither the old outputs nor the manifest change. With
        ``in_place`` the stage writes straight into its folder (for append-only, resumable outputs such as
        generated queries) and only the manifest is updated at the end. The caller must hold :meth:`lock`.
        """
        manifest = self.manifest()  # fail early on a bad manifest, before any work
        fingerprints = self._upstream(manifest, name, upstream)
        final = self.root / (out_dir or name)
        final.parent.mkdir(parents=True, exist_ok=True)
        if in_place:
            final.mkdir(parents=True, exist_ok=True)
            work = final
        else:
            work = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=self.root))
        started, t0 = now_iso(), time.perf_counter()
        run = StageRun(name=name, dir=work, params=params, libraries=libraries)
        try:
            yield run
            rel = final.relative_to(self.root).as_posix()
            outputs = [
                file_entry(p, work) | {"path": f"{rel}/{p.relative_to(work).as_posix()}"}
                for p in sorted(work.rglob("*"))
                if p.is_file()
            ]
            record = {
                "command": command,
                "params": run.params,
                "inputs": run.inputs,
                "outputs": outputs,
                "upstream": fingerprints,
                "metrics": run.metrics,
                "versions": library_versions(*run.libraries),
                "started": started,
                "finished": now_iso(),
                "duration_s": round(time.perf_counter() - t0, 3),
            }
            record["fingerprint"] = fingerprint({k: record[k] for k in ("params", "inputs", "outputs", "upstream")})
            if in_place:
                self._write_manifest(manifest, name, record)
            else:
                self._publish(work, final, manifest, name, record)
        finally:
            if not in_place:
                shutil.rmtree(work, ignore_errors=True)

    def _publish(self, tmp: Path, final: Path, manifest: dict[str, Any], name: str, record: dict[str, Any]) -> None:
        old = None
        if final.exists():
            old = Path(tempfile.mkdtemp(prefix=f".old-{final.name}-", dir=self.root))
            os.replace(final, old / "x")
        os.replace(tmp, final)
        try:
            self._write_manifest(manifest, name, record)
        except BaseException:
            shutil.rmtree(final, ignore_errors=True)
            if old is not None:
                os.replace(old / "x", final)
            raise
        finally:
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)

    def _write_manifest(self, manifest: dict[str, Any], name: str, record: dict[str, Any]) -> None:
        manifest = dict(manifest)
        manifest["stages"] = dict(manifest["stages"]) | {name: record}
        manifest["schema_version"] = SCHEMA_VERSION
        manifest["gloss_version"] = __version__
        manifest.setdefault("created", record["started"])
        manifest["updated"] = record["finished"]
        atomic_write_text(self.manifest_path, json.dumps(manifest, indent=2) + "\n")

    # -- status -------------------------------------------------------------------------------------------
    def _changed_outputs(self, record: dict[str, Any]) -> str | None:
        for entry in record.get("outputs", []):
            path = self.root / entry["path"]
            if not path.is_file():
                return f"{entry['path']} is missing"
            if path.stat().st_size != entry["size"] or ("sha256" in entry and sha256_file(path) != entry["sha256"]):
                return f"{entry['path']} changed on disk"
        for entry in record.get("inputs", []):
            path = Path(entry["path"])
            path = path if path.is_absolute() else self.root / path
            # A source that is gone does not matter (outputs are self-contained); one that changed does.
            if (
                path.is_file()
                and "sha256" in entry
                and (path.stat().st_size != entry["size"] or sha256_file(path) != entry["sha256"])
            ):
                return f"input {entry['path']} changed"
        return None

    def status(self) -> list[StageState]:
        """One row per stage record (``index/bm25``, ``eval/...``), and one per pipeline stage never run."""
        stages = self.manifest()["stages"]
        dataset = (stages.get("data") or {}).get("params", {}).get("dataset", "beauty")
        states: dict[str, StageState] = {}
        optional = {spec.name for spec, _ in OPTIONAL}
        order = [o for spec in PIPELINE for o in (*(x for x, before in OPTIONAL if before == spec.name), spec)]
        for spec in order:
            command = spec.command.format(dataset=dataset)
            names = [n for n in stages if n == spec.name or n.startswith(spec.name + "/")]
            if not names and spec.name not in optional:
                states[spec.name] = StageState(spec.name, "missing", "never run", command)
            for name in names:
                record = stages[name]
                reason = self._changed_outputs(record)
                for up, recorded in record.get("upstream", {}).items():
                    if reason:
                        break
                    up_record = stages.get(up)
                    if up_record is None:
                        reason = f"upstream '{up}' is missing"
                    elif recorded != up_record.get("fingerprint"):
                        reason = f"upstream '{up}' was re-run"
                    elif up in states and states[up].state == "stale":
                        reason = f"upstream '{up}' is stale"
                states[name] = StageState(
                    name,
                    "stale" if reason else "done",
                    reason or "",
                    record.get("command", command),
                    record.get("finished"),
                )
        return list(states.values())
