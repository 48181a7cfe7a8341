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
    MAX_COUNT,
    MAX_QUERIES,
    JsonOpt,
    ProjectOpt,
    QuietOpt,
    RetrieverOpt,
    complete_split,
)


def rerank(
    split: Annotated[
        str, typer.Option("--split", "-s", help="validation or test.", autocompletion=complete_split)
    ] = "validation",
    retriever: RetrieverOpt = "bm25",
    num_queries: Annotated[
        int,
        typer.Option(
            min=0,
            max=MAX_QUERIES,
            help="Generated queries after the last item's title in the pool (0: that title alone).",
        ),
    ] = 2,
    candidates: Annotated[
        int, typer.Option(min=1, max=MAX_COUNT, help="Pool size per user (top-K of each query, fused).")
    ] = 20,
    with_transitions: Annotated[
        bool,
        typer.Option(
            "--with-transitions",
            help="Fuse the transitions list (items that followed the user's recent items in the training sequences) "
            "first into the pool.",
        ),
    ] = False,
    batch_size: Annotated[
        int, typer.Option(min=0, max=MAX_BATCH, help="Users per scoring batch (0: 64 on CUDA, 4 on CPU).")
    ] = 0,
    dtype: Annotated[str, typer.Option(help="auto (bf16 on CUDA, fp32 on CPU), bf16, fp16 or fp32.")] = "auto",
    project: ProjectOpt = DEFAULT_PROJECT_PATH,
    json_: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Score each user's pool of retrieved candidates with the fine-tuned model, for 'gloss eval --rerank'.

    The pool: the last item's title and the first --num-queries generated titles, each retrieving its top
    --candidates items, fused, history items excluded. Each candidate gets log p(its title | the user's prompt)
    from the model. Writes rerank/<split>/candidates.parquet (another retriever than BM25:
    rerank/<split>-<retriever>/; --with-transitions: rerank/<split>-transitions[-<retriever>]/).
    Under torchrun --nproc-per-node N -m gloss_cli rerank ..., N processes (one per GPU) share the pools and rank 0
    writes the same file.

    [dim]Examples:[/]

      gloss rerank --split validation && gloss eval --split validation --rerank fused

      gloss rerank --split test --num-queries 0 --candidates 50     # rerank LIS's top 50, no generation needed

      torchrun --nproc-per-node 4 -m gloss_cli rerank --split test   # 4 GPUs, a quarter of the pools each
    """
    from gloss_cli.project import Project
    from gloss_cli.rerank import run

    here = world()  # under torchrun: rank 0 takes the lock, writes the stage and prints; the others score
    reporter = RichReporter(quiet) if here.main else Reporter()
    proj = Project(project)
    from gloss_cli.evaluate import MAX_SEEN_EXTRA
    from gloss_cli.limits import check_retrieval

    # The pool is a fused retrieval of the last item's title and the queries, history excluded: bounded before work.
    check_retrieval(
        proj.root, split, candidates, queries=num_queries + 1, depth=candidates + MAX_SEEN_EXTRA, option="--candidates"
    )
    command = f"gloss rerank --split {split} --retriever {retriever} --num-queries {num_queries}"
    command += f" --candidates {candidates}" + (" --with-transitions" if with_transitions else "")
    with proj.lock(command, reporter) if here.main else contextlib.nullcontext():
        result = run(
            proj,
            split,
            retriever=retriever,
            num_queries=num_queries,
            candidates=candidates,
            with_transitions=with_transitions,
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
    also = " --with-transitions" if with_transitions else ""
    reporter.info(f"next: gloss eval --split {split} --rerank fused --retriever {retriever}{also}")
