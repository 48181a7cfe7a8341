"""`gloss eval`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from gloss_cli.console import RichReporter, print_json
from gloss_cli.options import (
    DEFAULT_PROJECT_PATH,
    MAX_COUNT,
    MAX_QUERIES,
    EncoderOpt,
    JsonOpt,
    ProjectOpt,
    QuietOpt,
    RetrieverOpt,
)

# What each kind of run reads. A flag it does not read is refused with one line, never ignored: `gloss eval
# --baseline transitions --protocol paper --retriever e5` used to run and drop both.
_NOT_READ = {
    "transitions": (
        "--baseline transitions",
        "its list is ranked by summed votes, with no query, retriever or protocol",
        ("retriever", "encoder", "protocol", "num_queries", "with_lis"),
    ),
    "lis": ("--baseline lis", "its one query is the last item's title", ("num_queries", "with_lis")),
    "rerank": (
        "--rerank",
        "the pools were made by 'gloss rerank' (history excluded; its --num-queries and --candidates)",
        ("protocol", "exclude_seen", "num_queries", "with_lis", "baseline", "queries", "match_generated", "encoder"),
    ),
}


def _refuse_flags_that_do_not_apply(baseline: str | None, rerank: str | None) -> None:
    from gloss_cli.errors import GlossError
    from gloss_cli.invocation import given

    flags = given()
    kind = "rerank" if rerank else baseline
    if kind in _NOT_READ:
        what, why, unread = _NOT_READ[kind]
        for name in unread:
            if name in flags:
                flag = "--" + name.replace("_", "-")
                raise GlossError(f"{flag} does not apply to {what}: {why}.", f"Drop {flag}.")
    if not rerank and baseline and "queries" in flags and "match_generated" not in flags:
        raise GlossError(
            f"--queries does not apply to --baseline {baseline} alone: a baseline reads no queries.",
            "Add --match-generated to score the baseline on the file's users, or drop --queries.",
        )
    if not rerank and not baseline and "match_generated" in flags:
        raise GlossError(
            "--match-generated applies to a baseline: the model's queries already cover the generated users.",
            "Drop --match-generated, or add --baseline lis or --baseline transitions.",
        )


def evaluate(
    retriever: RetrieverOpt = "bm25",
    encoder: EncoderOpt = None,
    split: Annotated[str, typer.Option(help="test or validation.")] = "test",
    k: Annotated[
        list[int] | None,
        typer.Option(
            "--k",
            "-k",
            min=1,
            max=MAX_COUNT,
            help="Cut-off; repeat for several (default 5); at most the catalog's size.",
        ),
    ] = None,
    protocol: Annotated[
        str, typer.Option(help="paper: top-1 per generated query, as GLoSS; fused: top-K per query, rank fusion.")
    ] = "paper",
    exclude_seen: Annotated[
        bool, typer.Option("--exclude-seen", help="Never recommend the user's history items.")
    ] = False,
    baseline: Annotated[
        str | None,
        typer.Option(
            help="lis: query with the title of the user's last item; transitions: the items that followed the "
            "user's recent items in the training sequences (no model, no retrieval)."
        ),
    ] = None,
    queries: Annotated[
        Path | None,
        typer.Option(
            help="Queries file: GLoSS JSON (reviewer_id, asin, seen_asins, generated_sequences), or a "
            "'gloss generate' queries.jsonl (its users; with --baseline and --match-generated: the baseline on them). "
            "Each entry's target and history must be the split's (a file made from other data is refused); "
            "the run's name ends with a hash of the file."
        ),
    ] = None,
    num_queries: Annotated[
        int,
        typer.Option(min=1, max=MAX_QUERIES, help="Generated queries used per user (the first ones, best beam first)."),
    ] = 5,
    match_generated: Annotated[
        bool,
        typer.Option(
            "--match-generated", help="Only the users 'gloss generate' (or the --queries .jsonl) covered (baselines)."
        ),
    ] = False,
    with_lis: Annotated[
        bool,
        typer.Option(
            "--with-lis", help="Put the LIS query (the last item's title) before the generated queries (fusion)."
        ),
    ] = False,
    with_transitions: Annotated[
        bool,
        typer.Option(
            "--with-transitions",
            help="Fuse the transitions list (see --baseline transitions) first, before the queries' lists "
            "(--protocol fused); with --rerank: order the pools 'gloss rerank --with-transitions' made.",
        ),
    ] = False,
    rerank: Annotated[
        str | None,
        typer.Option(
            help="After 'gloss rerank': order each pool by the model's score (lm) or fuse that order with the "
            "pool's (fused); --retriever picks the pools (those 'gloss rerank --retriever' made)."
        ),
    ] = None,
    name: Annotated[
        str | None, typer.Option(help="Run name (default: <source>-<retriever>-<protocol>-<split>).")
    ] = None,
    project: ProjectOpt = DEFAULT_PROJECT_PATH,
    json_: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Evaluate recommendations: Recall@K, NDCG@K and MRR@K on the held-out item, with a bootstrap 95% CI.

    Queries come from 'gloss generate' (default), a GLoSS JSON file (--queries) or the Last-Item-Search baseline
    (--baseline lis); --baseline transitions and --with-transitions add what followed the user's recent items in
    the training sequences. The index is built on the fly if missing. Writes eval/<name>/: per_user.parquet,
    run.trec + qrels.trec (for ranx / trec_eval) and metrics.json.

    [dim]Examples:[/]

      gloss eval --baseline lis

      gloss eval --retriever e5 --protocol fused --exclude-seen

      gloss eval --protocol fused --exclude-seen --with-transitions --with-lis --num-queries 2

      gloss eval --baseline transitions --exclude-seen

      gloss eval --queries llama-1b_test.json -k 5 -k 10

      gloss eval --split validation --rerank fused      # after 'gloss rerank --split validation'
    """
    from gloss_cli.evaluate import run
    from gloss_cli.project import Project

    _refuse_flags_that_do_not_apply(baseline, rerank)
    reporter = RichReporter(quiet)
    proj = Project(project)
    if not rerank:  # the cut-off within the catalog, the retrieval within the free memory, before any work
        from gloss_cli.evaluate import MAX_SEEN_EXTRA
        from gloss_cli.limits import check_retrieval

        depth = max(k or [5]) if protocol == "fused" or baseline == "lis" else 1  # paper: each query's top 1
        check_retrieval(
            proj.root,
            split,
            max(k or [5]),
            queries=1 if baseline == "lis" else num_queries + with_lis,
            depth=None if baseline == "transitions" else depth + (MAX_SEEN_EXTRA if exclude_seen else 0),
            option="-k",
        )
    command = f"gloss eval --retriever {retriever} --split {split} --protocol {protocol}"
    command += (" --exclude-seen" if exclude_seen else "") + (f" --baseline {baseline}" if baseline else "")
    command += f" --queries {queries}" if queries else ""
    command += " --with-lis" if with_lis else ""
    command += " --with-transitions" if with_transitions else ""
    if rerank:
        command = f"gloss eval --split {split} --rerank {rerank} --retriever {retriever}"
        command += " --with-transitions" if with_transitions else ""
    with proj.lock(command, reporter):
        result = run(
            proj,
            split=split,
            retriever=retriever,
            encoder=encoder,
            ks=k,
            protocol=protocol,
            exclude_seen=exclude_seen,
            queries_file=queries,
            baseline=baseline,
            num_queries=num_queries,
            match_generated=match_generated,
            with_lis=with_lis,
            with_transitions=with_transitions,
            rerank=rerank,
            name=name,
            command=command,
            reporter=reporter,
        )
    if json_:
        print_json(
            {
                "project": str(proj.root),
                "run": result.name,
                "protocol": result.protocol,
                "protocol_description": result.describe(),
                "split": result.split,
                "retriever": result.retriever,
                "source": result.source,
                "users": result.users,
                "k": result.ks,
                "exclude_seen": result.exclude_seen,
                "metrics": result.metrics,
                "ci95": result.ci,
                "notes": result.notes,
                "folder": str(result.folder),
            }
        )
        return
    from gloss_cli.render import eval_table

    eval_table(result)
