"""`gloss data`."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Annotated

import typer

from gloss_cli.console import RichReporter, print_json
from gloss_cli.options import DEFAULT_PROJECT_PATH, MAX_SEED, JsonOpt, ProjectOpt, QuietOpt, complete_dataset
from gloss_cli.project import Project


def data_command(dataset: str, source: Path | None, items: Path | None, columns: str | None, bench: str | None) -> str:
    """How to redo this run (what status shows): a log's files are part of it; Amazon sources are found again."""
    if dataset != "log":
        return f"gloss data --dataset {dataset}" + (f" --benchmark {bench}" if bench else "")
    command = "gloss data" + (f" --source {shlex.quote(str(source))}" if source else "")
    command += f" --items {shlex.quote(str(items))}" if items else ""
    return command + (f" --columns {shlex.quote(columns)}" if columns else "")


def data(
    dataset: Annotated[
        str | None,
        typer.Option(
            "--dataset",
            "-d",
            help="beauty, toys, sports (Amazon 2014), amazon2023/<Category> (Amazon Reviews 2023, e.g. "
            "amazon2023/All_Beauty), or log (an interaction log). Default: log when --source is a file, else beauty.",
            autocompletion=complete_dataset,
            show_default=False,
        ),
    ] = None,
    source: Annotated[
        Path | None,
        typer.Option(
            help="Amazon: the folder with the dataset's files (2014: the original reviews_*_5/meta_* .json.gz or the "
            "compact interactions.csv.gz + items.csv.gz; 2023: <Category>.jsonl + meta_<Category>.jsonl, or the "
            "benchmark's <Category>.{train,valid,test}.csv; gzipped or not). Default: $GLOSS_DATA_DIR/<dataset>, "
            "else download. A file: an interaction log (.csv, .tsv, .parquet, .jsonl; CSV / JSON lines may be .gz).",
            show_default=False,
        ),
    ] = None,
    items: Annotated[
        Path | None,
        typer.Option(
            help="An interaction log's items file (.csv, .tsv, .parquet, .jsonl): one row per item, with a title.",
            show_default=False,
        ),
    ] = None,
    columns: Annotated[
        str | None,
        typer.Option(
            help="An interaction log's columns: user=COL,item=COL,time=COL,title=COL (defaults user_id, item_id, "
            "timestamp, title; item names the items file's id column too) and time_unit=s|ms|us|ns|iso (default: "
            "integers' unit read from their size, datetimes as such).",
            show_default=False,
        ),
    ] = None,
    benchmark: Annotated[
        str | None,
        typer.Option(
            help="Amazon 2023 only: take the McAuley lab's published 5-core splits, last_out or last_out_w_his "
            "(test / validation / train equal the files'), or timestamp or timestamp_w_his (global cut-off times; "
            "each user's first valid and first test row are scored, later rows are counted, not scored), "
            "instead of processing the raw reviews.",
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

      gloss data -d amazon2023/Video_Games --benchmark last_out_w_his -p runs/vg

      gloss data --source log.parquet --items items.csv --columns user=uid,item=iid,time=ts,title=name
    """
    from gloss_cli.data import run as run_data
    from gloss_cli.sources import dataset_info

    reporter = RichReporter(quiet)
    if dataset is None:
        dataset = "log" if source is not None and source.is_file() else "beauty"
    info = dataset_info(dataset)
    proj = Project(project)
    command = data_command(info.name, source, items, columns, benchmark) + (" --dedup" if dedup else "")
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
            items=items,
            columns=columns,
            benchmark=benchmark,
        )
    if json_:
        print_json({"project": str(proj.root), "dataset": info.name, "stats": stats, "warnings": reporter.warnings})
        return
    from gloss_cli.render import data_table

    data_table(info, stats)
    reporter.info(f"wrote {proj.root / 'data'}; next: gloss status")
