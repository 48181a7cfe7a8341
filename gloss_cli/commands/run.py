"""`gloss run`: the main job."""

from __future__ import annotations

from typing import Annotated

import typer

from gloss_cli.console import RichReporter, print_json
from gloss_cli.options import (
    DEFAULT_PROJECT_PATH,
    MAX_COUNT,
    DatasetOpt,
    JsonOpt,
    ProjectOpt,
    QuietOpt,
    RetrieverOpt,
)


def run(
    dataset: DatasetOpt = "beauty",
    full: Annotated[
        bool,
        typer.Option(
            "--full", help="Paper scale (use a GPU): all users, full fine-tuning, 3 epochs, batch 64, lr 2e-4."
        ),
    ] = False,
    limit_users: Annotated[
        int | None, typer.Option(min=1, max=MAX_COUNT, help="Train on the first N users (default 800; --full: all).")
    ] = None,
    epochs: Annotated[
        int | None,
        typer.Option(min=1, max=MAX_COUNT, help="Training epochs (default 1; --full: 3, early stopping)."),
    ] = None,
    eval_users: Annotated[
        int | None,
        typer.Option(min=1, max=MAX_COUNT, help="Test users to generate for and evaluate (default 200; --full: all)."),
    ] = None,
    retriever: RetrieverOpt = "bm25",
    model: Annotated[
        str | None,
        typer.Option(
            help="Base model (default smollm2-135m-instruct-q4_1, offline from PyPI; see gloss train --help)."
        ),
    ] = None,
    backend: Annotated[
        str | None, typer.Option(help="Generation backend: hf or llama-cpp (default: llama-cpp on a CPU if installed).")
    ] = None,
    project: ProjectOpt = DEFAULT_PROJECT_PATH,
    json_: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Run the whole pipeline: data, train, index, generate, eval (model vs LIS), segments; done stages are skipped.

    CPU default: LoRA with the completion loss on 800 training users for one epoch, then 200 test users with
    llama.cpp: 17 minutes on 2 idle cores (measured; see the README).

    [dim]Examples:[/]

      gloss run --dataset beauty

      gloss run --dataset toys --full -p runs/toys
    """
    from gloss_cli.pipeline import RunPlan, run_all
    from gloss_cli.project import Project

    plan = RunPlan.make(
        full=full,
        dataset=dataset,
        train_users=limit_users,
        epochs=epochs,
        eval_users=eval_users,
        retriever=retriever,
        model=model,
        backend=backend,
    )
    reporter = RichReporter(quiet)
    proj = Project(project)
    with proj.lock(f"gloss run --dataset {dataset}" + (" --full" if full else ""), reporter):
        summary = run_all(proj, plan, reporter=reporter)
    if json_:
        print_json(
            {
                "project": str(proj.root),
                "plan": plan.__dict__,
                "steps": summary.steps,
                "runs": summary.rows,
                "plot": str(summary.plot),
            }
        )
        return
    from gloss_cli.render import run_summary

    run_summary(summary)
