"""`gloss recommend`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from gloss_cli.console import RichReporter, print_json
from gloss_cli.errors import GlossError
from gloss_cli.options import (
    DEFAULT_PROJECT_PATH,
    MAX_COUNT,
    EncoderOpt,
    JsonOpt,
    ProjectOpt,
    QuietOpt,
    RecipeOpt,
    RetrieverOpt,
    recipe_of,
)


def _lines(path: Path, what: str) -> list[str]:
    try:
        values = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise GlossError(
            f"Cannot read {what} file {path} ({exc}).", "Pass a UTF-8 text file, one entry per line."
        ) from None
    if not values:
        raise GlossError(f"{path} is empty.", f"Put one {what} per line.")
    return values


def recommend(
    user: Annotated[list[str] | None, typer.Option("--user", "-u", help="User id (repeat for several).")] = None,
    users_file: Annotated[Path | None, typer.Option(help="File with one user id per line (JSONL output).")] = None,
    history: Annotated[
        list[str] | None, typer.Option("--history", help="An item title, oldest first; repeat (for new people).")
    ] = None,
    history_file: Annotated[Path | None, typer.Option(help="File with one item title per line, oldest first.")] = None,
    k: Annotated[
        int, typer.Option("--k", "-k", min=1, max=MAX_COUNT, help="How many items (at most the catalog's size).")
    ] = 10,
    retriever: RetrieverOpt = "bm25",
    encoder: EncoderOpt = None,
    recipe: RecipeOpt = None,
    backend: Annotated[
        str | None,
        typer.Option(
            help="ct2, llama-cpp or hf (default on a CPU: llama-cpp if installed, else ct2 if installed, else hf)."
        ),
    ] = None,
    profile: Annotated[
        bool,
        typer.Option("--profile", help="Print where the time went (loading too; with --json: a load_s object)."),
    ] = False,
    project: ProjectOpt = DEFAULT_PROJECT_PATH,
    json_: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Recommend next items, ranked by a recipe (default gloss: what followed the user's latest items elsewhere,
    the last item's title and the model's 2 best generated titles, each searching the catalog, fused).

    [dim]Examples:[/]

      gloss recommend --user A2CZ4YVBIJFW6J

      gloss recommend --history "Maybelline Great Lash Mascara" --history "Neutrogena Makeup Remover" -k 5

      gloss recommend --users-file users.txt --json > recs.jsonl

      gloss recommend --user A2CZ4YVBIJFW6J --recipe paper     # GLoSS as published: the 5 queries' top-1 each

      gloss recommend --user A2CZ4YVBIJFW6J --recipe "lists=sasrec,transitions"   # after gloss sasrec: no LM
    """
    from gloss_cli.recommend import Recommender

    ids = list(user or []) + (_lines(users_file, "user id") if users_file else [])
    titles = list(history or []) + (_lines(history_file, "title") if history_file else [])
    if bool(ids) == bool(titles):
        raise GlossError(
            "Pass either --user / --users-file or --history / --history-file.", "E.g. gloss recommend --user ID"
        )
    reporter = RichReporter(quiet)
    from gloss_cli.limits import data_stats, require_k_within_catalog
    from gloss_cli.project import Project

    stats = data_stats(Project(project).root)
    if stats is not None and isinstance(stats.get("items"), int):
        require_k_within_catalog([k], stats["items"])

    recommender = Recommender(
        Project(project),
        retriever=retriever,
        encoder=encoder,
        backend=backend,
        recipe=recipe_of(recipe),
        k=k,
        reporter=reporter,
    )
    results = recommender.for_users(ids) if ids else [recommender.for_history(titles)]
    if json_:
        load = {"load_s": {key: round(v, 4) for key, v in recommender.load_timings.items()}} if profile else {}
        docs = [r.as_dict() | load for r in results]
        if users_file:  # JSONL: one document per user
            for doc in docs:
                print_json(doc, indent=None)
        else:
            print_json(docs[0] if len(docs) == 1 else docs)
        return
    from gloss_cli.render import recommendations

    for r in results:
        recommendations(r, profile=profile, recipe=recommender.recipe, load=recommender.load_timings)
