"""Options shared by every command (aliases, so that every command spells them the same way)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from gloss_cli.project import DEFAULT_PROJECT

ProjectOpt = Annotated[
    Path,
    typer.Option(
        "--project",
        "-p",
        envvar="GLOSS_PROJECT",
        help="Project folder (manifest.json + one folder per stage).",
        show_default=True,
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout instead of tables.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress or info messages (warnings stay).")]


def _complete_dataset(incomplete: str) -> list[str]:
    from gloss_cli.sources import DATASETS

    return [name for name in DATASETS if name.startswith(incomplete)]


DatasetOpt = Annotated[
    str,
    typer.Option(
        "--dataset", "-d", help="beauty, toys or sports.", autocompletion=_complete_dataset, show_default=True
    ),
]
DEFAULT_PROJECT_PATH = Path(DEFAULT_PROJECT)


def complete_split(incomplete: str) -> list[str]:
    return [s for s in ("validation", "test") if s.startswith(incomplete)]


RetrieverOpt = Annotated[
    str,
    typer.Option(
        "--retriever",
        "-r",
        help="bm25, dense (uses --encoder), or an encoder name: minilm, mpnet, e5, e5-base, an HF id or a path; "
        "two joined by '+' (bm25+e5) fuse their lists by reciprocal rank.",
        show_default=True,
    ),
]
EncoderOpt = Annotated[
    str | None,
    typer.Option(help="Encoder for --retriever dense (default minilm: all-MiniLM-L6-v2, offline from PyPI)."),
]

# Upper bounds of numeric options: far past any sensible value, yet within what every library's integers hold (a
# value past them is a typo, refused by the option itself rather than by an overflow deep in a stage).
MAX_QUERIES = 100  # generated titles (beams) per user
MAX_COUNT = 1_000_000_000  # users, steps, epochs
MAX_BATCH = 1_048_576  # examples or users per batch
MAX_TOKENS = 1_048_576  # tokens per example or per generated title
MAX_SEED = 2**32 - 1  # numpy's seeds


def positive(value: float | None) -> float | None:
    """Option callback for a value that must be > 0 (typer's ``min`` is inclusive)."""
    if value is not None and not value > 0:
        raise typer.BadParameter(f"{value} is not greater than 0.")
    return value
