"""The `gloss` command: options -> one stage call -> render. No ML logic and no heavy imports here.

Stage modules (and polars, torch, ...) are imported inside the commands, so `gloss --help` and tab completion
stay instant.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

import typer
from typer.core import TyperGroup

from gloss_cli import __version__
from gloss_cli.console import RichReporter, print_error, print_json
from gloss_cli.errors import GlossError
from gloss_cli.project import DEFAULT_PROJECT, Project


class GlossGroup(TyperGroup):
    """Turns a GlossError into one error line + a hint and exit code 1 (GLOSS_DEBUG=1 keeps the traceback)."""

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except GlossError as exc:
            if os.environ.get("GLOSS_DEBUG"):
                raise
            print_error(exc.message, exc.hint)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            if os.environ.get("GLOSS_DEBUG"):
                raise
            print_error("Interrupted; nothing was half-written.", "Run the same command again to redo the stage.")
            raise typer.Exit(130) from None


app = typer.Typer(
    name="gloss",
    cls=GlossGroup,
    help=(
        "[bold]gloss[/]: LLM-based sequential recommendation (GLoSS) made real and reproducible.\n\n"
        "A purchase history becomes a prompt of item titles; a fine-tuned causal LM generates the next item's "
        "title with beam search; each generated title queries a retriever over the catalog.\n\n"
        "[dim]Start with:[/]  gloss data --dataset beauty  [dim]then[/]  gloss status"
    ),
    context_settings={"help_option_names": ["-h", "--help"]},
    rich_markup_mode="rich",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)

# -- options shared by every command ------------------------------------------------------------------------
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


def _version(value: bool) -> None:
    if value:
        typer.echo(f"gloss {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    pass


@app.command()
def data(
    dataset: Annotated[
        str,
        typer.Option(
            "--dataset",
            "-d",
            help="beauty, toys or sports.",
            autocompletion=_complete_dataset,
            show_default=True,
        ),
    ] = "beauty",
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
    project: ProjectOpt = Path(DEFAULT_PROJECT),
    json_: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Prepare a dataset: titles, per-user sequences, leave-one-out train / validation / test splits.

    Processing equals GLoSS's (25-word titles, untitled items dropped, users with >= 3 interactions,
    a 5 % validation sample drawn with seed 42), so results compare with the paper.

    [dim]Examples:[/]

      gloss data --dataset beauty

      GLOSS_DATA_DIR=../shared/data/amazon2014 gloss data -d sports -p runs/sports

      gloss data -d toys --source ~/amazon --train-examples all-prefixes --json
    """
    from gloss_cli.data import run as run_data
    from gloss_cli.sources import dataset_info

    reporter = RichReporter(quiet)
    info = dataset_info(dataset)
    proj = Project(project)
    command = f"gloss data --dataset {info.name}" + (" --dedup" if dedup else "")
    if train_examples != "last":
        command += f" --train-examples {train_examples}"
    with proj.lock(command):
        stats = run_data(
            proj, info, source, dedup=dedup, train_examples=train_examples, command=command, reporter=reporter
        )
    if json_:
        print_json({"project": str(proj.root), "dataset": info.name, "stats": stats, "warnings": reporter.warnings})
        return
    from gloss_cli.render import data_table

    data_table(info, stats)
    reporter.info(f"wrote {proj.root / 'data'}; next: gloss status")


@app.command()
def status(project: ProjectOpt = Path(DEFAULT_PROJECT), json_: JsonOpt = False, quiet: QuietOpt = False) -> None:
    """Show each stage of the project as done, stale or missing, and the next command to run.

    [dim]Example:[/]  gloss status -p runs/beauty
    """
    proj = Project(project)
    states = proj.status()
    pending = next((s for s in states if s.state != "done"), None)
    next_command = pending.command if pending else None
    if pending and str(proj.root) != str(Path(DEFAULT_PROJECT).absolute()):
        next_command = f"{pending.command} --project {project}"
    if json_:
        print_json(
            {
                "project": str(proj.root),
                "exists": proj.exists(),
                "stages": [s.__dict__ for s in states],
                "next": next_command,
            }
        )
        return
    from gloss_cli.render import status_table

    status_table(proj, states, next_command)


def main() -> None:
    app(prog_name="gloss")
