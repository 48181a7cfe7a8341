"""The one exception type whose message is meant for a person."""

from __future__ import annotations


class GlossError(Exception):
    """A user-facing error: one line saying what is wrong, and a hint saying what to do.

    The CLI prints both and exits with code 1, without a traceback (set ``GLOSS_DEBUG=1`` to see it).
    Real bugs are not GlossErrors and keep their traceback.
    """

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = " ".join(message.split())  # always one line
        self.hint = " ".join(hint.split()) if hint else None

    def __str__(self) -> str:
        return self.message
