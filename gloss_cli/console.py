"""Rich output. stdout carries results only (tables, or one JSON document); stderr carries the rest.

Stage modules never print: they take a :class:`Reporter` and call it. The CLI passes a :class:`RichReporter`;
tests and library callers get the silent base class.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

out = Console(soft_wrap=True)  # results (stdout)
err = Console(stderr=True)  # messages, hints and progress (stderr)
# Seconds between plain progress lines off a terminal (GLOSS_PROGRESS_INTERVAL overrides; tests use 0).
PROGRESS_INTERVAL = 30.0


class Tick:
    """Advance handle given to a stage inside :meth:`Reporter.progress`."""

    def __init__(self, progress: Progress | None = None, task: Any = None) -> None:
        self._progress, self._task = progress, task

    def advance(self, n: float = 1) -> None:
        if self._progress is not None:
            self._progress.advance(self._task, n)

    def update(self, **fields: Any) -> None:
        if self._progress is not None:
            self._progress.update(self._task, **fields)


class LogTick(Tick):
    """Plain progress lines for logs (nohup, Slurm, CI, ``2> log``), where a live bar prints nothing until the end.

    A line every ``interval`` seconds, or at each further 10 % once ``interval / 6`` seconds have passed since the
    last line (so that a short stage stays quiet), and a last line when the stage ends if it printed any or took
    longer than that: ``<task>: done/total (pct), rate/s, ETA h:mm:ss``, like Hugging Face Trainer's logs.
    """

    def __init__(
        self,
        description: str,
        total: float | None,
        *,
        interval: float,
        bytes_: bool = False,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__()
        self.description, self.total, self.interval, self.bytes_ = description, total, interval, bytes_
        self.clock = clock
        self.done = 0.0
        self.start = self.last = clock()
        self.decile = 0
        self.lines = 0
        self.shown = -1.0  # the amount the last line showed

    def advance(self, n: float = 1) -> None:
        self.done += n
        now = self.clock()
        decile = int(10 * self.done / self.total) if self.total else 0
        if now - self.last >= self.interval or (decile > self.decile and now - self.last >= self.interval / 6):
            self.decile = decile
            self._emit(now)

    def update(self, **fields: Any) -> None:
        # Stages put live figures (loss, tokens/s) in the description; the next line carries them.
        if "description" in fields:
            self.description = str(fields["description"])
        if fields.get("total") is not None:
            self.total = float(fields["total"])
        if fields.get("completed") is not None:
            self.done = float(fields["completed"])

    def finish(self) -> None:
        now = self.clock()
        if self.shown != self.done and (self.lines or now - self.start >= self.interval / 6):
            self._emit(now)

    def line(self, now: float) -> str:
        elapsed = max(now - self.start, 1e-9)
        if not self.total and not self.done:  # a stage that reports no steps (building an index): its time only
            return f"{self.description}: done in {_clock(elapsed)}"
        rate = self.done / elapsed
        text = f"{self.description}: {_amount(self.done, self.bytes_)}"
        if self.total:
            text += f"/{_amount(self.total, self.bytes_)} ({100 * self.done / self.total:.0f}%)"
        text += f", {_amount(rate, True) if self.bytes_ else f'{rate:,.2f}'}/s"
        if self.total and self.done >= self.total:
            return text + f", done in {_clock(elapsed)}"
        if self.total and rate > 0:
            return text + f", ETA {_clock((self.total - self.done) / rate)}"
        return text + f", elapsed {_clock(elapsed)}"

    def _emit(self, now: float) -> None:
        self.last, self.lines, self.shown = now, self.lines + 1, self.done
        err.print(self.line(now), markup=False, highlight=False, soft_wrap=True)


def _amount(value: float, bytes_: bool) -> str:
    if not bytes_:
        return f"{value:,.0f}"
    for unit in ("B", "kB", "MB"):
        if value < 1000:
            return f"{value:,.1f} {unit}"
        value /= 1000
    return f"{value:,.1f} GB"


def _clock(seconds: float) -> str:
    whole = int(seconds)
    return f"{whole // 3600}:{whole // 60 % 60:02d}:{whole % 60:02d}"


def stderr_is_terminal() -> bool:
    """Whether stderr is a terminal (not nohup, Slurm, CI or ``2> log``). Not rich's ``is_terminal``, which
    FORCE_COLOR turns on even for a file."""
    isatty = getattr(sys.stderr, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # a closed stream
        return False


def progress_interval() -> float:
    """Seconds between plain progress lines: GLOSS_PROGRESS_INTERVAL, else 30."""
    value = os.environ.get("GLOSS_PROGRESS_INTERVAL")
    try:
        return max(float(value), 0.0) if value else PROGRESS_INTERVAL
    except ValueError:
        return PROGRESS_INTERVAL


class Reporter:
    """Silent reporter: the default for library use and tests."""

    def info(self, message: str) -> None:
        """A progress message (stderr)."""

    def warn(self, message: str) -> None:
        """Something the user should know but that does not stop the stage."""

    @contextmanager
    def progress(self, description: str, total: float | None, *, bytes_: bool = False) -> Iterator[Tick]:
        yield Tick()


class RichReporter(Reporter):
    def __init__(self, quiet: bool = False) -> None:
        self.quiet = quiet
        self.warnings: list[str] = []

    def info(self, message: str) -> None:
        if not self.quiet:
            err.print(f"[dim]•[/] {escape(message)}", highlight=False, soft_wrap=True)

    def warn(self, message: str) -> None:
        self.warnings.append(message)
        err.print(f"[bold yellow]warning:[/] {escape(message)}", highlight=False, soft_wrap=True)

    @contextmanager
    def progress(self, description: str, total: float | None, *, bytes_: bool = False) -> Iterator[Tick]:
        if self.quiet:
            yield Tick()
            return
        if not stderr_is_terminal():  # a log file: a live bar would print nothing until the end
            tick = LogTick(description, total, interval=progress_interval(), bytes_=bytes_)
            yield tick
            tick.finish()
            return
        columns: list[Any] = [TextColumn("{task.description}"), BarColumn()]
        if bytes_:
            columns += [DownloadColumn(), TransferSpeedColumn()]
        else:
            columns += [MofNCompleteColumn(), TaskProgressColumn()]
        columns += [TimeElapsedColumn(), TimeRemainingColumn()]
        with Progress(*columns, console=err, transient=True) as progress:
            task = progress.add_task(description, total=total)
            yield Tick(progress, task)


def print_error(message: str, hint: str | None) -> None:
    # Messages quote what users wrote (ids, paths): "[/x]" there is text, not rich markup.
    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    if hint:
        err.print(f"[bold cyan]hint:[/] {escape(hint)}", highlight=False, soft_wrap=True)


def print_json(document: Any, indent: int | None = 2) -> None:
    """One JSON document on stdout (plain, so that `jq` and pipes get exactly the bytes); indent=None: one line."""
    sys.stdout.write(json.dumps(document, indent=indent, default=str, ensure_ascii=False) + "\n")
    sys.stdout.flush()
