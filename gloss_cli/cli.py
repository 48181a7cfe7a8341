"""The `gloss` command: options -> one stage call -> render. No ML logic and no heavy imports here.

Stage modules (and polars, torch, ...) are imported inside the commands, so `gloss --help` and tab completion
stay instant.
"""

from __future__ import annotations

import logging
import os
from typing import Annotated, Any, NoReturn

import typer
from typer.core import TyperGroup

from gloss_cli import __version__
from gloss_cli.console import print_error
from gloss_cli.errors import GlossError

try:  # newer typer carries its own copy of click, whose exceptions are not click's
    from typer._click.exceptions import UsageError
except ImportError:  # pragma: no cover
    from click.exceptions import UsageError  # type: ignore[assignment]


def _usage_error(exc: UsageError, ctx: Any = None) -> NoReturn:
    """A usage error (unknown option or command, bad or missing value) in gloss's own form, with exit code 1
    (click's is 2): one ``error:`` line and a hint to read the command's help, instead of click's usage box."""
    if type(exc).__name__ == "NoArgsIsHelpError":  # a bare 'gloss': click prints the help
        raise exc
    if os.environ.get("RANK", "0") != "0":  # torchrun's other processes parsed the same line: rank 0 says it once
        raise typer.Exit(1) from None
    where = "gloss"
    if exc.ctx is not None:
        where = exc.ctx.command_path
    elif ctx is not None:  # the parser's errors carry no context: the subcommand being parsed is the group's
        where = " ".join(filter(None, (ctx.command_path, ctx.invoked_subcommand)))
    print_error(" ".join(exc.format_message().split()), f"Run '{where} --help'.")
    raise typer.Exit(1) from None


class _NoKernelHubNotice(logging.Filter):
    """bitsandbytes (the qlora extra), imported with peft by every training run, logs on a CPU that it could not
    fetch a 4-bit kernel from the Hugging Face kernel hub: a notice about a download gloss never asked for, which
    said nothing about the run (LoRA and full training load no 4-bit kernel; QLoRA on a CPU runs bitsandbytes' own)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "kernels-community" not in record.getMessage()


logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_NoKernelHubNotice())


# An optional library's top-level module -> (what gloss needs it for, the extra that installs it)
OPTIONAL = {
    "bm25s": ("BM25 retrieval", "bm25"),
    "matplotlib": ("the segments chart", "plot"),
    "usearch": ("dense retrieval", "dense"),
    "sentence_transformers": ("dense retrieval", "dense"),
    "torch": ("training and generation", "train"),
    "transformers": ("training and generation", "train"),
    "peft": ("LoRA training", "train"),
    "accelerate": ("training and generation", "train"),
    "gguf": ("the PyPI GGUF models", "train"),
    "llama_cpp": ("the llama-cpp backend", "llama"),
    "ctranslate2": ("the ct2 backend", "ct2"),
    "tokenizers": ("the ct2 backend", "train"),
    "bitsandbytes": ("QLoRA (--method qlora)", "qlora"),
}


def _missing_library(exc: ModuleNotFoundError) -> tuple[str, str] | None:
    """The error and hint for an optional library that is not installed (None: not one of them)."""
    top = (exc.name or "").split(".")[0]
    if top not in OPTIONAL:
        return None
    purpose, extra = OPTIONAL[top]
    return (
        f"{top} is not installed; {purpose} needs it.",
        f"pip install -c constraints.txt -e '.[{extra}]' (a checkout) or pip install 'gloss[{extra}]'.",
    )


class GlossGroup(TyperGroup):
    """Turns a GlossError into one error line + a hint and exit code 1 (GLOSS_DEBUG=1 keeps the traceback), and
    click's usage errors into the same form."""

    def make_context(self, info_name: str | None, args: list[str], parent: Any = None, **extra: Any) -> Any:
        # The group's own options and arguments are parsed here, outside invoke.
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except UsageError as exc:
            _usage_error(exc)

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except UsageError as exc:  # a subcommand's options are parsed inside the group's invoke
            _usage_error(exc, ctx)
        except GlossError as exc:
            if os.environ.get("GLOSS_DEBUG"):
                raise
            print_error(exc.message, exc.hint)
            raise typer.Exit(1) from None
        except ModuleNotFoundError as exc:  # an optional library the installed extras left out
            missing = _missing_library(exc)
            if missing is None or os.environ.get("GLOSS_DEBUG"):
                raise
            print_error(*missing)
            raise typer.Exit(1) from None
        except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM / SIGHUP turned into project.Interrupted
            if os.environ.get("GLOSS_DEBUG"):
                raise
            print_error("Interrupted; nothing was half-written.", "Run the same command again to redo the stage.")
            raise typer.Exit(getattr(exc, "exit_code", 130)) from None


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
    experiment,
    generate,
    index,
    recipes,
    recommend,
    rerank,
    run,
    sasrec,
    segments,
    status,
    train,
)

app.command()(data.data)
app.command()(train.train)
app.command()(sasrec.sasrec)
app.command()(generate.generate)
app.command()(index.index)
app.command()(rerank.rerank)
app.command("eval")(evaluate.evaluate)
app.command()(segments.segments)
app.command()(recommend.recommend)
app.command()(run.run)
app.command()(status.status)
app.command()(recipes.recipes)
app.add_typer(experiment.app, name="experiment")


def main() -> None:
    app(prog_name="gloss")
