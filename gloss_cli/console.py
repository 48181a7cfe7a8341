"""Rich output. stdout carries results only (tables, or one JSON document); stderr carries the rest.

Stage modules never print: they take a :class:`Reporter` and call it. The CLI passes a :class:`RichReporter`;
tests and library callers get the silent base class.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console
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
            err.print(f"[dim]•[/] {message}", highlight=False, soft_wrap=True)

    def warn(self, message: str) -> None:
        self.warnings.append(message)
        err.print(f"[bold yellow]warning:[/] {message}", highlight=False, soft_wrap=True)

    @contextmanager
    def progress(self, description: str, total: float | None, *, bytes_: bool = False) -> Iterator[Tick]:
        if self.quiet:
            yield Tick()
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
    err.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    if hint:
        err.print(f"[bold cyan]hint:[/] {hint}", highlight=False, soft_wrap=True)


def print_json(document: Any, indent: int | None = 2) -> None:
    """One JSON document on stdout (plain, so that `jq` and pipes get exactly the bytes); indent=None: one line."""
    sys.stdout.write(json.dumps(document, indent=indent, default=str, ensure_ascii=False) + "\n")
    sys.stdout.flush()
