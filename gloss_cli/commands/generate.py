"""`gloss generate`."""

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
    MAX_TOKENS,
    JsonOpt,
    ProjectOpt,
    QuietOpt,
    complete_split,
)
from gloss_cli.project import Project


def generate(
    split: Annotated[
        str, typer.Option("--split", "-s", help="validation or test.", autocompletion=complete_split)
    ] = "test",
    users: Annotated[
        list[str] | None,
        typer.Option("--users", help="Only these user ids (repeat the option, or separate ids with commas)."),
    ] = None,
    limit: Annotated[int, typer.Option(min=0, max=MAX_COUNT, help="Only the first N users of the split (0: all).")] = 0,
    backend: Annotated[
        str,
        typer.Option(
            help="hf (transformers), llama-cpp (gloss's beam search on a q8_0 GGUF) or ct2 (CTranslate2's beam "
            "search on int8 weights; CPU). The GGUF and the CTranslate2 model are converted once and cached."
        ),
    ] = "hf",
    beams: Annotated[int, typer.Option(min=1, max=MAX_QUERIES, help="Beam width (the paper: 5).")] = 5,
    num_return: Annotated[
        int, typer.Option(min=1, max=MAX_QUERIES, help="Titles kept per user, best beam first (<= --beams).")
    ] = 5,
    max_new_tokens: Annotated[int, typer.Option(min=1, max=MAX_TOKENS, help="Most tokens per generated title.")] = 50,
    batch_size: Annotated[
        int,
        typer.Option(
            min=0,
            max=MAX_BATCH,
            help="Users per generate call (0: auto; hf: 256 on CUDA, 64 with --search hf, 8 on CPU).",
        ),
    ] = 0,
    dtype: Annotated[
        str,
        typer.Option(help="auto (hf: bf16 on CUDA, fp32 on CPU; ct2: int8), bf16, fp16 or fp32 (llama-cpp: q8_0)."),
    ] = "auto",
    search: Annotated[
        str,
        typer.Option(
            help="hf backend: gloss (batched beam search, each prompt prefilled once) or hf (transformers "
            "generate, ~5x the prompt work); both give the same beams."
        ),
    ] = "gloss",
    catalog_only: Annotated[
        bool,
        typer.Option(
            "--catalog-only",
            help="Beams may only spell catalog titles, token for token (beam search over a trie of the catalog; "
            "the 5 returned titles are 5 distinct items). gloss search only.",
        ),
    ] = False,
    stop_at_newline: Annotated[
        bool,
        typer.Option(
            "--stop-at-newline",
            help="A beam also ends at the end of its title line, as at EOS (a query is that line): a weakly "
            "trained model that never writes EOS stops there instead of running to --max-new-tokens. Recorded; "
            "gloss recommend serves what the stage did. gloss run's CPU default uses it.",
        ),
    ] = False,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Start the queries file again instead of resuming it.")
    ] = False,
    project: ProjectOpt = DEFAULT_PROJECT_PATH,
    json_: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Generate next-item titles for each user with beam search (the queries for retrieval).

    Appends one JSON line per user to generate/<split>/queries.jsonl: user_id, target, history,
    queries (best beam first) and scores. Killed half way, the same command resumes where it stopped.
    Under torchrun --nproc-per-node N -m gloss_cli generate ..., N processes (one per GPU) share the users and
    rank 0 merges their parts into the same file.

    [dim]Examples:[/]

      gloss generate --split test

      gloss generate --split validation --limit 100 --beams 5 --num-return 5

      gloss generate --split test --search hf          # transformers generate instead (same beams, slower)

      gloss generate --split test --backend ct2        # CTranslate2 on the CPU (int8; converted once)

      gloss generate --split validation --catalog-only   # every beam a catalog title

      gloss generate --users A1YJEY40AYMN6I,A2V5KA3OKOQ0W --split test --json

      torchrun --nproc-per-node 4 -m gloss_cli generate --split test   # 4 GPUs, a quarter of the users each
    """
    from gloss_cli.generate import GenerateOptions
    from gloss_cli.generate import run as run_generate

    options = GenerateOptions(
        backend, beams, num_return, max_new_tokens, batch_size, dtype, search, catalog_only, stop_at_newline
    )
    here = world()  # under torchrun: rank 0 takes the lock, writes the stage and prints; the others generate
    reporter = RichReporter(quiet) if here.main else Reporter()
    proj = Project(project)
    command = f"gloss generate --split {split}"
    defaults = GenerateOptions()
    for key in ("backend", "beams", "num_return", "max_new_tokens", "batch_size", "dtype", "search"):
        if getattr(options, key) != getattr(defaults, key):
            command += f" --{key.replace('_', '-')} {getattr(options, key)}"
    command += " --catalog-only" if catalog_only else ""
    command += " --stop-at-newline" if stop_at_newline else ""
    command += f" --limit {limit}" if limit else ""
    command += f" --users {','.join(users)}" if users else ""
    with proj.lock(command, reporter) if here.main else contextlib.nullcontext():
        result = run_generate(
            proj, split, options, users=users, limit=limit, overwrite=overwrite, command=command, reporter=reporter
        )
    if not here.main:
        return
    metrics = result.metrics()
    if json_:
        print_json({"project": str(proj.root), "path": str(result.path), "metrics": metrics})
        return
    from gloss_cli.console import out

    rate = f", {metrics['s_per_user']:.2f} s/user, {metrics['tokens_per_s']:,.0f} tokens/s" if result.users_new else ""
    out.print(
        f"{result.split}: {result.users_new:,} users generated, {result.users_skipped:,} already done "
        f"({result.users_in_file:,} in {result.path}){rate}"
    )
    reporter.info(f"next: gloss eval --split {split}")
