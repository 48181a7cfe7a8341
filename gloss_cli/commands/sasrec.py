"""`gloss sasrec`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

from gloss_cli.console import RichReporter, print_json
from gloss_cli.options import (
    DEFAULT_PROJECT_PATH,
    MAX_BATCH,
    MAX_COUNT,
    MAX_SEED,
    JsonOpt,
    ProjectOpt,
    QuietOpt,
)

if TYPE_CHECKING:
    from gloss_cli.sasrec import SasrecResult


def sasrec(
    hidden: Annotated[list[int] | None, typer.Option(min=1, max=4096, help="Hidden size (default 64).")] = None,
    blocks: Annotated[list[int] | None, typer.Option(min=1, max=64, help="Self-attention blocks (default 2).")] = None,
    heads: Annotated[list[int] | None, typer.Option(min=1, max=64, help="Attention heads (default 1).")] = None,
    dropout: Annotated[
        list[float] | None, typer.Option(min=0.0, max=0.99, help="Dropout (default: both 0.2 and 0.5, the search).")
    ] = None,
    lr: Annotated[list[float] | None, typer.Option(help="Adam's learning rate (default 0.001).")] = None,
    max_len: Annotated[
        int, typer.Option(min=1, max=4096, help="Most recent items a sequence keeps.", show_default=True)
    ] = 50,
    batch_size: Annotated[int, typer.Option(min=1, max=MAX_BATCH, help="Sequences per step.", show_default=True)] = 128,
    loss: Annotated[
        str, typer.Option(help="ce: softmax over every item; bce: one sampled negative (the paper's).")
    ] = "ce",
    epochs: Annotated[
        int, typer.Option(min=1, max=MAX_COUNT, help="Most epochs per setting.", show_default=True)
    ] = 200,
    patience: Annotated[
        int,
        typer.Option(
            min=1, max=MAX_COUNT, help="Epochs without a better validation NDCG@10 before stopping.", show_default=True
        ),
    ] = 5,
    seed: Annotated[int, typer.Option(min=0, max=MAX_SEED, help="Initialisation, shuffling and dropout seed.")] = 0,
    project: ProjectOpt = DEFAULT_PROJECT_PATH,
    json_: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Train SASRec, an item-ID sequential recommender, on the train split: the anchor the recipe 'sasrec' scores.

    Every setting of the grid is trained (the options that take several values: --hidden, --blocks, --heads,
    --dropout, --lr; each given twice or more is searched), each stopped early on validation NDCG@10 with history
    excluded; the best is kept at its best epoch. Uses CUDA when there is one, else the CPU (GLOSS_THREADS). Writes
    sasrec/: model.pt and meta.json (every setting tried, its validation numbers per epoch, train time, device).

    [dim]Examples:[/]

      gloss sasrec                                   # dropout 0.2 and 0.5, the rest at the defaults

      gloss sasrec --dropout 0.5 --heads 1 --heads 2

      gloss sasrec --loss bce --epochs 400 --patience 20   # the paper's loss

      gloss eval --recipe sasrec -k 5 -k 10          # then score it
    """
    from gloss_cli.project import Project
    from gloss_cli.sasrec import GRID, Settings, grid
    from gloss_cli.sasrec import run as run_sasrec

    values: dict[str, list[object]] = {"dropout": list(GRID["dropout"])}
    for name, given in (("hidden", hidden), ("blocks", blocks), ("heads", heads), ("dropout", dropout), ("lr", lr)):
        if given:
            values[name] = list(dict.fromkeys(given))
    base = Settings(max_len=max_len, batch_size=batch_size, loss=loss, epochs=epochs, patience=patience, seed=seed)
    settings = grid(base, values)
    proj = Project(project)
    command = "gloss sasrec" + "".join(f" --{k.replace('_', '-')} {v}" for k, vs in values.items() for v in vs)
    command += f" --max-len {max_len} --batch-size {batch_size} --loss {loss} --epochs {epochs}"
    command += f" --patience {patience} --seed {seed}"
    reporter = RichReporter(quiet)
    with proj.lock(command, reporter):
        result = run_sasrec(proj, settings, command=command, reporter=reporter)
    if json_:
        print_json({"project": str(proj.root), **_as_dict(result)})
        return
    _table(result)


def _as_dict(result: SasrecResult) -> dict[str, object]:
    from dataclasses import asdict

    return {
        "folder": str(result.folder),
        "chosen": asdict(result.chosen),
        "device": result.device,
        "train_seconds": result.train_seconds,
        "trials": [
            asdict(t.settings) | {"best_epoch": t.best_epoch, "epochs_run": len(t.epochs), "validation": t.best}
            for t in result.trials
        ],
    }


def _table(result: SasrecResult) -> None:
    from rich.table import Table

    from gloss_cli.console import out
    from gloss_cli.sasrec import SELECT_K, changed

    table = Table(
        title=f"gloss sasrec: {len(result.trials)} setting(s), chosen on validation NDCG@{SELECT_K} (history excluded)",
        title_justify="left",
        caption=f"{result.train_seconds:,.0f} s on {result.device}; {result.folder}",
    )
    for column in ("setting", "best epoch", "epochs run", f"recall@{SELECT_K}", f"ndcg@{SELECT_K}", "seconds"):
        table.add_column(column, justify="left" if column == "setting" else "right")
    for t in result.trials:
        words = changed(t.settings, [t.settings for t in result.trials])
        mark = "[bold]" if t.settings == result.chosen else ""
        table.add_row(
            f"{mark}{words}",
            str(t.best_epoch),
            str(len(t.epochs)),
            f"{t.best[f'recall@{SELECT_K}']:.4f}",
            f"{t.best[f'ndcg@{SELECT_K}']:.4f}",
            f"{t.seconds:,.0f}",
        )
    out.print(table)
