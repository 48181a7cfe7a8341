"""`gloss rerank`."""

from __future__ import annotations

import contextlib
from typing import Annotated

import typer

from gloss_cli.console import Reporter, RichReporter, print_json
from gloss_cli.distributed import world
from gloss_cli.options import (
    DEFAULT_PROJECT_PATH,
    MAX_BATCH,
    JsonOpt,
    ProjectOpt,
    QuietOpt,
    RecipeOpt,
    RetrieverOpt,
    complete_split,
    recipe_of,
)


def rerank(
    split: Annotated[
        str, typer.Option("--split", "-s", help="validation or test.", autocompletion=complete_split)
    ] = "test",
    recipe: RecipeOpt = None,
    retriever: RetrieverOpt = "bm25",
    batch_size: Annotated[
        int, typer.Option(min=0, max=MAX_BATCH, help="Users per scoring batch (0: 64 on CUDA, 4 on CPU).")
    ] = 0,
    dtype: Annotated[str, typer.Option(help="auto (bf16 on CUDA, fp32 on CPU), bf16, fp16 or fp32.")] = "auto",
    project: ProjectOpt = DEFAULT_PROJECT_PATH,
    json_: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Score each user's pool of candidates with the fine-tuned model, for 'gloss eval --recipe rerank'.

    The pool: the top 'candidates' of the recipe's own list in retrieval order (default recipe rerank: the gloss
    recipe's list, its top 20). Each candidate gets log p(its title | the user's prompt) from the model. Writes
    rerank/<split>-<pool recipe>-<candidates>-<retriever>/candidates.parquet.
    Under torchrun --nproc-per-node N -m gloss_cli rerank ..., N processes (one per GPU) share the pools and rank 0
    writes the same file.
    A model trained with 'gloss train --task pick --pool P' scores P's pools (only those) in one forward pass per
    user: the log-softmax over the pool's letters (logprob; tokens = 1).

    [dim]Examples:[/]

      gloss rerank && gloss eval --recipe rerank

      gloss rerank --split validation --recipe "rerank candidates=50"

      gloss rerank --recipe "lists=lis order=fused candidates=50"     # LIS's top 50: no generation needed

      torchrun --nproc-per-node 4 -m gloss_cli rerank --split test   # 4 GPUs, a quarter of the pools each

      gloss rerank --recipe "transitions order=lm candidates=20 users=all"   # a --task pick model's pool

      gloss rerank --recipe "lists=sasrec,transitions order=fused candidates=20 users=all"   # after gloss sasrec
    """
    from gloss_cli.project import Project
    from gloss_cli.rerank import run

    here = world()  # under torchrun: rank 0 takes the lock, writes the stage and prints; the others score
    reporter = RichReporter(quiet) if here.main else Reporter()
    proj = Project(project)
    from gloss_cli.limits import check_retrieval
    from gloss_cli.ranking import MAX_SEEN_EXTRA

    chosen = recipe_of(recipe, "rerank")
    # The pool is the recipe's retrieval: bounded before any work
    queries = ("lis" in chosen.lists) + chosen.queries
    check_retrieval(
        proj.root,
        split,
        chosen.candidates,
        queries=max(queries, 1),
        depth=chosen.candidates + MAX_SEEN_EXTRA if queries else None,
        option="candidates=",
    )
    command = f"gloss rerank --split {split} --recipe '{chosen.explicit()}' --retriever {retriever}"
    with proj.lock(command, reporter) if here.main else contextlib.nullcontext():
        result = run(
            proj,
            split,
            recipe=chosen,
            retriever=retriever,
            batch_size=batch_size,
            dtype=dtype,
            command=command,
            reporter=reporter,
        )
    if not here.main:
        return
    metrics = result.metrics()
    if json_:
        print_json({"project": str(proj.root), "path": str(result.path), "metrics": metrics})
        return
    from gloss_cli.console import out

    out.print(
        f"{result.split}: {result.users:,} users' pools of {result.candidates} scored in {result.seconds:.1f} s "
        f"({metrics['users_per_s'] or 0:.1f} users/s); held-out item in the pool for {result.pool_recall:.2%} "
        f"of users -> {result.path}"
    )
    reporter.info(f"next: gloss eval --split {split} --recipe '{chosen.explicit()}' --retriever {retriever}")
