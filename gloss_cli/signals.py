"""SIGTERM and SIGHUP during a stage, turned into the exception Ctrl-C raises, so that one cleanup path serves all
three (the project lock released, the stage's temporary folder removed, the manifest untouched)."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from types import FrameType
from typing import Any


class Interrupted(KeyboardInterrupt):
    """SIGTERM (kill, a scheduler's stop) or SIGHUP (a closed terminal) during a stage, raised where Ctrl-C raises
    KeyboardInterrupt so that the same cleanup runs; the conventional exit code is 128 + the signal number."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"{signal.Signals(signum).name} received")
        self.signum = signum
        self.exit_code = 128 + signum


def _raise_interrupted(signum: int, frame: FrameType | None) -> None:
    signal.signal(signum, signal.SIG_IGN)  # a second signal must not cut the cleanup short
    raise Interrupted(signum)


@contextlib.contextmanager
def signals_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM and SIGHUP raise :class:`Interrupted` (unless ignored, as under nohup)."""
    if threading.current_thread() is not threading.main_thread():
        yield  # Python sets signal handlers from the main thread only
        return
    previous: dict[int, Any] = {}
    for name in ("SIGTERM", "SIGHUP"):
        signum = getattr(signal, name, None)
        if signum is not None and signal.getsignal(signum) is not signal.SIG_IGN:
            previous[signum] = signal.signal(signum, _raise_interrupted)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)
