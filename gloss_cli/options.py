"""Options shared by every command (aliases, so that every command spells them the same way)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from gloss_cli.project import DEFAULT_PROJECT

if TYPE_CHECKING:
    from gloss_cli.recipe import Recipe

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


def complete_dataset(incomplete: str) -> list[str]:
    from gloss_cli.amazon2023 import CATEGORIES, PREFIX
    from gloss_cli.sources import DATASETS

    names = [*DATASETS, *(PREFIX + c for c in CATEGORIES), "log"]
    return [name for name in names if name.startswith(incomplete)]


DatasetOpt = Annotated[
    str,
    typer.Option(
        "--dataset",
        "-d",
        help="beauty, toys, sports (Amazon 2014) or amazon2023/<Category> (Amazon Reviews 2023).",
        autocompletion=complete_dataset,
        show_default=True,
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


def _complete_recipe(incomplete: str) -> list[str]:
    from gloss_cli.recipe import PRESETS

    return [name for name in PRESETS if name.startswith(incomplete)]


RecipeOpt = Annotated[
    str | None,
    typer.Option(
        "--recipe",
        "-R",
        help="How each user's list is ranked: a preset (gloss, paper, lis, lis-paper, transitions, sasrec, no-model, "
        "model, rerank, rerank-lm; 'gloss recipes' shows them) or key=value words, after a preset they modify: "
        "lists=sasrec,transitions,lis,model queries=N merge=top1|rrf seen=kept|excluded order=retrieval|lm|fused "
        "candidates=N users=generated|all. Default: gloss (docs/RESULTS.md's pick; rerank: rerank).",
        autocompletion=_complete_recipe,
    ),
]


def recipe_of(text: str | None, default: str | None = None) -> Recipe:
    """The recipe an option names (None: ``default``, else gloss's default)."""
    from gloss_cli.recipe import DEFAULT, parse

    return parse(text if text is not None else default or DEFAULT)
