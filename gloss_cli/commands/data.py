"""`gloss data`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from gloss_cli.console import RichReporter, print_json
from gloss_cli.options import DEFAULT_PROJECT_PATH, MAX_SEED, DatasetOpt, JsonOpt, ProjectOpt, QuietOpt
from gloss_cli.project import Project


def data(
    dataset: DatasetOpt = "beauty",
    source: Annotated[
        Path | None,
        typer.Option(
            help="Folder with the original reviews_*_5/meta_* .json.gz files or the compact "
            "interactions.csv.gz + items.csv.gz pair. Default: $GLOSS_DATA_DIR/<dataset>, else download.",
            show_default=False,
        ),
    ] = None,
    dedup: Annotated[bool, typer.Option(help="Drop exact duplicate (user, item, time) reviews.")] = False,
    train_examples: Annotated[
        str,
        typer.Option(
            help="'last': one train example per user (the paper); 'all-prefixes': every prefix before "
            "the held-out items.",
        ),
    ] = "last",
    ties: Annotated[
        str,
        typer.Option(
            help="Order of a user's items that share a timestamp (a day in Amazon 2014): 'file': the file's order, "
            "an ASIN sort (the paper's); 'shuffle': a seeded random order (--seed). Later stages use it.",
        ),
    ] = "file",
    seed: Annotated[int, typer.Option(min=0, max=MAX_SEED, help="Seed of --ties shuffle.")] = 0,
    project: ProjectOpt = DEFAULT_PROJECT_PATH,
    json_: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Prepare a dataset: titles, per-user sequences, leave-one-out train / validation / test splits.

    Processing equals GLoSS's (25-word titles, untitled items dropped, users with >= 3 interactions,
    a 5 % validation sample drawn with seed 42), so results compare with the paper. Same-day ties are measured:
    how many held-out targets share the previous item's day, and whether the order inside a day is an item-id sort
    (--ties shuffle removes that order).

    [dim]Examples:[/]

      gloss data --dataset beauty

      GLOSS_DATA_DIR=../shared/data/amazon2014 gloss data -d sports -p runs/sports

      gloss data -d toys --source ~/amazon --train-examples all-prefixes --json

      gloss data -d sports --ties shuffle --seed 1 -p runs/sports-shuffled
    """
    from gloss_cli.data import run as run_data
    from gloss_cli.sources import dataset_info

    reporter = RichReporter(quiet)
    info = dataset_info(dataset)
    proj = Project(project)
    command = f"gloss data --dataset {info.name}" + (" --dedup" if dedup else "")
    if train_examples != "last":
        command += f" --train-examples {train_examples}"
    if ties != "file":
        command += f" --ties {ties} --seed {seed}"
    elif seed:
        reporter.warn(f"--seed {seed} is unused: only --ties shuffle draws at random.")
    with proj.lock(command, reporter):
        stats = run_data(
            proj,
            info,
            source,
            dedup=dedup,
            train_examples=train_examples,
            ties=ties,
            seed=seed,
            command=command,
            reporter=reporter,
        )
    if json_:
        print_json({"project": str(proj.root), "dataset": info.name, "stats": stats, "warnings": reporter.warnings})
        return
    from gloss_cli.render import data_table

    data_table(info, stats)
    reporter.info(f"wrote {proj.root / 'data'}; next: gloss status")
