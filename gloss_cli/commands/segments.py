"""`gloss segments`."""

from __future__ import annotations

from typing import Annotated

import typer

from gloss_cli.console import RichReporter, print_json
from gloss_cli.options import DEFAULT_PROJECT_PATH, MAX_COUNT, JsonOpt, ProjectOpt, QuietOpt


def segments(
    run: Annotated[list[str] | None, typer.Option("--run", help="Eval run(s) to compare (default: all).")] = None,
    k: Annotated[int, typer.Option("--k", "-k", min=1, max=MAX_COUNT, help="Cut-off of the metrics shown.")] = 5,
    by: Annotated[
        str,
        typer.Option(
            help="interactions: cold-start / regular / power users; ties: same-day / later day, by whether the "
            "run's target shares the previous item's timestamp (not on Toys, whose timestamps are order indices).",
        ),
    ] = "interactions",
    cold: Annotated[
        int | None,
        typer.Option(min=0, max=MAX_COUNT, help="Cold-start: at most this many interactions (default 5)."),
    ] = None,
    power: Annotated[
        int | None,
        typer.Option(
            min=0, max=MAX_COUNT, help="Power users: more than this many (default 14 Beauty, 13 Toys/Sports)."
        ),
    ] = None,
    project: ProjectOpt = DEFAULT_PROJECT_PATH,
    json_: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Split eval runs' per-user metrics into cold-start / regular / power users (or same-day / later-day targets,
    --by ties), with a PNG bar chart.

    [dim]Examples:[/]

      gloss segments

      gloss segments --run lis-bm25-paper-test --run model-bm25-paper-test --json

      gloss segments --by ties
    """
    from gloss_cli.project import Project
    from gloss_cli.segments import as_json
    from gloss_cli.segments import run as run_segments

    proj = Project(project)
    command = "gloss segments" + "".join(f" --run {r}" for r in run or []) + f" -k {k}"
    command += f" --by {by}" if by != "interactions" else ""
    with proj.lock(command, RichReporter(quiet)):
        report = run_segments(proj, runs=run, k=k, by=by, cold=cold, power=power, command=command)
    if json_:
        print_json(as_json(report))
        return
    from gloss_cli.render import segments_table

    segments_table(report)
