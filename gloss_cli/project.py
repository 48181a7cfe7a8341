"""The project directory: ``manifest.json``, one folder per stage, and a lock against concurrent writers.

The manifest is the memory of a project. Each stage records its parameters, inputs and outputs (paths relative to
the project, sizes, sha256 of small files), library versions, timings, its metrics and the fingerprints of the
upstream stages it used. A stage whose upstream fingerprint changed, or whose outputs changed on disk, is stale.

Stages write into a temporary folder inside the project and are published with renames, so a failed or
interrupted stage (Ctrl-C, SIGTERM) leaves neither partial output nor a changed manifest. A stage checks the files
of the stages it reads against their record before it uses them.
"""

from __future__ import annotations

import contextlib
import getpass
import hashlib
import json
import os
import platform
import shlex
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gloss_cli import __version__
from gloss_cli.errors import GlossError
from gloss_cli.invocation import invocation
from gloss_cli.signals import signals_interrupt

if TYPE_CHECKING:
    from gloss_cli.console import Reporter

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
LOCK = ".gloss.lock"  # who holds the project (JSON); present while a writer runs, or left by one that was killed
OS_LOCK = ".gloss.flock"  # the OS lock itself (flock); it stays in place, as unlinking a flock'd file races
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
    Stage("eval", ("data",), "gloss eval"),
    Stage("segments", ("data",), "gloss segments"),
)
# Stages that status lists when they have run and never asks for: (stage, the pipeline stage it comes before).
OPTIONAL: tuple[tuple[Stage, str], ...] = (
    (Stage("sasrec", ("data",), "gloss sasrec"), "eval"),
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
    """Path (relative to ``base`` when inside it), size, mtime, and sha256 for files under HASH_LIMIT."""
    stat = path.stat()
    shown = str(path.relative_to(base)) if base is not None and path.is_relative_to(base) else str(path)
    entry: dict[str, Any] = {"path": shown, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    if stat.st_size <= HASH_LIMIT:
        entry["sha256"] = sha256_file(path)
    return entry


def file_change(path: Path, entry: dict[str, Any]) -> str | None:
    """How the file at ``path`` differs from its manifest ``entry`` ("is missing", "changed"), or None.

    Same size and mtime: trusted without reading it, so checks stay cheap. Otherwise the sha256 decides (a copy or
    a touch keeps the content); a file too large to have one is judged by its size alone.
    """
    try:
        stat = path.stat()
    except FileNotFoundError:
        return "is missing"
    if stat.st_size != entry["size"]:
        return "changed"
    if stat.st_mtime_ns == entry.get("mtime_ns") or "sha256" not in entry:
        return None
    return "changed" if sha256_file(path) != entry["sha256"] else None


def library_versions(*names: str) -> dict[str, str]:
    versions = {"gloss": __version__, "python": platform.python_version()}
    for name in names:
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[name] = metadata.version(name)
    return versions


def fingerprint(document: Any) -> str:
    return hashlib.sha256(json.dumps(document, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _content(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """File entries without their mtime: a stage re-run that writes the same bytes keeps its fingerprint."""
    return [{k: v for k, v in entry.items() if k != "mtime_ns"} for entry in entries]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_file(path: Path, mode: str = "wb") -> Iterator[Any]:
    """A file to write ``path`` with: a temp file in the same folder (with a plainly created file's permissions, not
    mkstemp's owner-only ones), fsynced and renamed over ``path`` when the block ends. Readers see the old file or
    the new one, never half; if the block raises, the temp file goes and ``path`` is as it was."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, encoding=None if "b" in mode else "utf-8") as fh:
            os.fchmod(fh.fileno(), 0o666 & ~_umask())
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
    state: str  # "done" | "stale" (upstream or a source changed) | "modified" (its own outputs changed) | "missing"
    reason: str
    command: str
    finished: str | None = None


class Project:
    def __init__(self, root: Path | str) -> None:
        self.given = Path(root).expanduser()  # as the user spelled it, for the commands gloss suggests
        self.root = self.given.absolute()
        if self.root.exists() and not self.root.is_dir():
            raise GlossError(
                f"--project {self.given} is a file, not a project folder.",
                "Pass a folder (new or holding a gloss project), e.g. --project gloss-project.",
            )

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
            if version not in MIGRATIONS:
                raise GlossError(
                    f"{self.manifest_path} has schema {version}, which no gloss version wrote (this one writes "
                    f"{SCHEMA_VERSION}).",
                    "Restore the manifest from a backup, or start a fresh project with --project NEW_DIR.",
                )
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
        self.verify(name, record)
        return record

    def verify(self, name: str, record: dict[str, Any]) -> None:
        """Refuse to use a stage whose outputs changed (or went) on disk since it recorded them."""
        for entry in record.get("outputs", []):
            change = file_change(self.root / entry["path"], entry)
            if change:
                raise GlossError(
                    f"{entry['path']} {change} since stage '{name}' wrote it (the manifest has its size and sha256).",
                    f"Rebuild stage '{name}', then run this command again: {self.redo_command(name, record)}",
                )

    def redo_command(self, name: str, record: dict[str, Any] | None = None) -> str:
        """The command that (re)makes stage ``name``: the command line that made it, else the pipeline's."""
        record = record or {}
        spec = next((s for s in (*PIPELINE, *(o for o, _ in OPTIONAL)) if s.name == name.split("/")[0]), None)
        default = spec.command.format(dataset="beauty") if spec else f"gloss {name.split('/')[0]}"
        return self.with_project(record.get("invocation") or record.get("command") or default)

    def with_project(self, command: str) -> str:
        """``command`` with the --project option this project needs (none for the default folder)."""
        if self.root == Path(DEFAULT_PROJECT).absolute():
            return command
        return f"{command} --project {shlex.quote(str(self.given))}"

    def path(self, relative: str) -> Path:
        return self.root / relative

    # -- lock ---------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def lock(self, command: str, reporter: Reporter | None = None) -> Iterator[None]:
        """Refuse a second writer, and turn SIGTERM / SIGHUP into :class:`Interrupted` while the lock is held.

        Mutual exclusion is an OS lock (flock, through filelock) on ``.gloss.flock``: the kernel drops it when its
        process ends, however it ends, so two writers can never both take it. ``.gloss.lock`` names the holder for
        the message a second writer gets; one found on taking the OS lock was left by a killed writer of this host
        and is taken over. One naming another host is respected: whether that process lives cannot be known here.
        """
        from filelock import FileLock, Timeout

        from gloss_cli.console import Reporter

        reporter = reporter or Reporter()
        self.root.mkdir(parents=True, exist_ok=True)
        os_lock = FileLock(self.root / OS_LOCK, timeout=0)
        deadline = time.monotonic() + 1.0
        while True:
            try:
                os_lock.acquire()
                break
            except Timeout:
                holder = self._holder()
                if holder is None and time.monotonic() < deadline:  # it is starting or releasing: try again
                    time.sleep(0.05)
                    continue
                raise self._locked(holder or {}) from None
        mine = False
        try:
            self._take_over(reporter)
            called = invocation()
            me = {"pid": os.getpid(), "host": socket.gethostname(), "user": getpass.getuser(), "since": now_iso()}
            atomic_write_text(self.root / LOCK, json.dumps(me | {"command": called[1] if called else command}))
            mine = True
            self._remove_leftovers(reporter)
            with signals_interrupt():
                yield
        finally:
            if mine:
                (self.root / LOCK).unlink(missing_ok=True)  # before the OS lock goes: no holder file is left behind
            os_lock.release()

    def _holder(self) -> dict[str, Any] | None:
        """The holder file's content: None when there is none, {} when it cannot be read."""
        try:
            doc = json.loads((self.root / LOCK).read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return {}
        return doc if isinstance(doc, dict) else {}

    def _locked(self, holder: dict[str, Any]) -> GlossError:
        elsewhere = holder.get("host") not in (None, socket.gethostname())
        return GlossError(
            f"Project {self.root} is locked by '{holder.get('command', '?')}' "
            f"(pid {holder.get('pid', '?')}, user {holder.get('user', '?')} on {holder.get('host', '?')}, "
            f"since {holder.get('since', '?')}).",
            f"Wait for it to finish; if that process is gone, delete {self.root / LOCK}."
            if elsewhere
            else f"Wait for it to finish, or stop it: kill {holder.get('pid', '<pid>')}.",
        )

    def _take_over(self, reporter: Reporter) -> None:
        """We hold the OS lock: a holder file still there is a killed writer's (or another host's: refused)."""
        holder = self._holder()
        if holder is None:
            return
        if holder.get("host") not in (None, socket.gethostname()):
            raise self._locked(holder)
        who = (
            f"'{holder['command']}' (pid {holder.get('pid', '?')}, since {holder.get('since', '?')})"
            if "command" in holder
            else f"an unreadable {LOCK}"
        )
        reporter.warn(f"took over the lock of {who}: that process ended without releasing it.")

    def _remove_leftovers(self, reporter: Reporter) -> None:
        """Temp folders and files of a writer that was killed (kill -9, out of memory). Nobody else writes while we
        hold the lock, so every one found now is a leftover."""
        left = [p for pattern in (".tmp-*", ".old-*", ".*.tmp") for p in sorted(self.root.glob(pattern))]
        for path in left:
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        if left:
            reporter.info(f"removed what an interrupted gloss left in {self.root}: {', '.join(p.name for p in left)}")

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
            self.verify(up, record)
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
            work.chmod(0o777 & ~_umask())  # mkdtemp's owner-only mode would be published with the folder
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
            called = invocation()
            record = {
                "command": command,
                # `gloss run` redoes any of its stages that is not done; other commands only their own family
                **({"invocation": called[1]} if called and called[0] in (name.split("/")[0], "run") else {}),
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
            record["fingerprint"] = fingerprint(
                {"params": run.params, "inputs": _content(run.inputs), "outputs": _content(outputs)}
                | {"upstream": fingerprints}
            )
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
    def _modified(self, record: dict[str, Any]) -> str | None:
        for entry in record.get("outputs", []):
            change = file_change(self.root / entry["path"], entry)
            if change:
                return f"{entry['path']} {'changed on disk' if change == 'changed' else change}"
        return None

    def _stale_input(self, record: dict[str, Any]) -> str | None:
        for entry in record.get("inputs", []):
            path = Path(entry["path"])
            path = path if path.is_absolute() else self.root / path
            # A source that is gone does not matter (outputs are self-contained); one that changed does.
            if path.is_file() and "sha256" in entry and file_change(path, entry):
                return f"input {entry['path']} changed"
        return None

    def _upstream_problem(self, record: dict[str, Any], stages: dict[str, Any], states: dict[str, StageState]) -> str:
        for up, recorded in record.get("upstream", {}).items():
            up_record = stages.get(up)
            if up_record is None:
                return f"upstream '{up}' is missing"
            if recorded != up_record.get("fingerprint"):
                return f"upstream '{up}' was re-run"
            if up in states and states[up].state in ("stale", "modified"):
                return f"upstream '{up}' is {states[up].state}"
        return ""

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
                modified = self._modified(record)
                reason = modified or self._stale_input(record) or self._upstream_problem(record, stages, states)
                states[name] = StageState(
                    name,
                    "modified" if modified else "stale" if reason else "done",
                    reason or "",
                    record.get("invocation") or record.get("command", command),
                    record.get("finished"),
                )
        return list(states.values())
