"""The `gloss` command: options -> one stage call -> render. No ML logic and no heavy imports here.

Stage modules (and polars, torch, ...) are imported inside the commands, so `gloss --help` and tab completion
stay instant.
"""

from __future__ import annotations

import os
from typing import Annotated, Any

import typer
from typer.core import TyperGroup

from gloss_cli import __version__
from gloss_cli.console import print_error
from gloss_cli.errors import GlossError


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


from gloss_cli.commands import (  # noqa: E402
    data,
    evaluate,
    generate,
    index,
    recommend,
    rerank,
    run,
    segments,
    status,
    train,
)

app.command()(data.data)
app.command()(train.train)
app.command()(generate.generate)
app.command()(index.index)
app.command()(rerank.rerank)
app.command("eval")(evaluate.evaluate)
app.command()(segments.segments)
app.command()(recommend.recommend)
app.command()(run.run)
app.command()(status.status)


def main() -> None:
    app(prog_name="gloss")
