"""`gloss run`: the main job."""

from __future__ import annotations

from typing import Annotated

import typer

from gloss_cli.console import RichReporter, print_json
from gloss_cli.options import (
    DEFAULT_PROJECT_PATH,
    MAX_COUNT,
    MAX_TOKENS,
    DatasetOpt,
    JsonOpt,
    ProjectOpt,
    QuietOpt,
    RecipeOpt,
    RetrieverOpt,
    recipe_of,
)


def run(
    dataset: DatasetOpt = "beauty",
    full: Annotated[
        bool,
        typer.Option(
            "--full",
            help="Paper scale (use a GPU): all users, full fine-tuning, 3 epochs, batch 64, lr 2e-4, 5 beams, "
            "no time budget.",
        ),
    ] = False,
    limit_users: Annotated[
        int | None,
        typer.Option(min=1, max=MAX_COUNT, help="Train on the first N users (default 2000; --full: all)."),
    ] = None,
    train_minutes: Annotated[
        float | None,
        typer.Option(
            min=0.0,
            max=1e6,
            help="Time budget for training (default 3; --full: 0, none); the step reached is recorded, and "
            "gloss train --stop-at-step replays it on any machine.",
        ),
    ] = None,
    epochs: Annotated[
        int | None,
        typer.Option(min=1, max=MAX_COUNT, help="Training epochs (default 1; --full: 3, early stopping)."),
    ] = None,
    eval_users: Annotated[
        int | None,
        typer.Option(min=1, max=MAX_COUNT, help="Test users to generate for and evaluate (default 300; --full: all)."),
    ] = None,
    max_seq_len: Annotated[
        int | None,
        typer.Option(
            min=1,
            max=MAX_TOKENS,
            help="Tokens per training example and generation prompt (default 256: the latest items; --full: 1024).",
        ),
    ] = None,
    retriever: RetrieverOpt = "bm25",
    recipe: RecipeOpt = None,
    model: Annotated[
        str | None,
        typer.Option(
            help="Base model (default smollm2-135m-instruct-q4_1, offline from PyPI; see gloss train --help)."
        ),
    ] = None,
    backend: Annotated[
        str | None,
        typer.Option(
            help="Generation backend: hf, llama-cpp or ct2 (default on a CPU: llama-cpp if installed, else ct2 if "
            "installed, else hf)."
        ),
    ] = None,
    project: ProjectOpt = DEFAULT_PROJECT_PATH,
    json_: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Run the whole pipeline: data, train, index, generate, eval (model vs LIS), segments; done stages are skipped.

    CPU default: LoRA with the completion loss for 3 minutes (a time budget) on short prompts, then 2 beams for
    300 test users; the table leads with the declared recipe (--recipe, default gloss: transitions + LIS + the
    model's 2 queries), then its parts and the paper's protocol, and prints paired CIs against LIS and against the
    same lists without the model (benchmarks/main_job.json: the
    whole README command, install included, and its rows on a 2-core machine).

    [dim]Examples:[/]

      gloss run --dataset beauty

      gloss run --dataset toys --full -p runs/toys
    """
    from gloss_cli.distributed import world
    from gloss_cli.errors import GlossError
    from gloss_cli.pipeline import RunPlan, run_all
    from gloss_cli.project import Project

    if world().several:  # each process would take the project lock and run every stage: one line instead
        raise GlossError(
            "gloss run is one process: under torchrun every process would run every stage.",
            "Run it without torchrun, or launch its stages with torchrun one by one: gloss train, gloss generate.",
        )

    plan = RunPlan.make(
        full=full,
        dataset=dataset,
        train_users=limit_users,
        train_minutes=train_minutes,
        max_seq_len=max_seq_len,
        epochs=epochs,
        eval_users=eval_users,
        retriever=retriever,
        model=model,
        backend=backend,
        recipe=recipe_of(recipe).explicit() if recipe is not None else None,
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
                "comparisons": summary.comparisons,
                "train": summary.train,
                "plot": str(summary.plot),
            }
        )
        return
    from gloss_cli.render import run_summary

    run_summary(summary)
