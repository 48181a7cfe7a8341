"""`gloss eval`."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from gloss_cli.console import RichReporter, print_json
from gloss_cli.options import (
    DEFAULT_PROJECT_PATH,
    MAX_COUNT,
    EncoderOpt,
    JsonOpt,
    ProjectOpt,
    QuietOpt,
    RecipeOpt,
    RetrieverOpt,
    recipe_of,
)

if TYPE_CHECKING:
    from gloss_cli.recipe import Recipe


def _refuse_flags_that_do_not_apply(recipe: Recipe) -> None:
    """A flag the recipe does not read is one line, never ignored."""
    from gloss_cli.errors import GlossError
    from gloss_cli.invocation import given

    flags = given()
    unread: tuple[str, ...] = ()
    why = ""
    if recipe.lists == ("transitions",):
        unread, why = ("retriever", "encoder"), "its one list is ranked by summed votes, with no query to retrieve"
    elif not recipe.retrieves:
        unread, why = ("retriever", "encoder"), "its lists are ranked by their own scores, with no query to retrieve"
    elif recipe.reranked:
        unread, why = ("encoder",), "it orders the pools 'gloss rerank' scored (--retriever picks whose)"
    for name in unread:
        if name in flags:
            flag = "--" + name.replace("_", "-")
            raise GlossError(f"{flag} does not apply to recipe {recipe.name()}: {why}.", f"Drop {flag}.")


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
    recipe: RecipeOpt = None,
    queries_file: Annotated[
        Path | None,
        typer.Option(
            "--queries",
            help="Queries file: GLoSS JSON (reviewer_id, asin, seen_asins, generated_sequences), or a "
            "'gloss generate' queries.jsonl: the recipe's model list reads it, and a recipe without the model "
            "scores its users. "
            "Each entry's target and history must be the split's (a file made from other data is refused); "
            "the run's name ends with a hash of the file.",
        ),
    ] = None,
    name: Annotated[str | None, typer.Option(help="Run name (default: <recipe>-<retriever>-<split>).")] = None,
    project: ProjectOpt = DEFAULT_PROJECT_PATH,
    json_: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Evaluate recommendations: Recall@K, NDCG@K and MRR@K on the held-out item, with a bootstrap 95% CI.

    --recipe says how each user's list is ranked (default gloss: the transitions list, the last item's title and
    the model's first 2 generated titles, fused, history excluded; paper: GLoSS as published). Queries come from
    'gloss generate' or a file (--queries). The index is built on the fly if missing. Writes eval/<name>/:
    per_user.parquet, run.trec + qrels.trec (for ranx / trec_eval) and metrics.json.

    [dim]Examples:[/]

      gloss eval                                   # the gloss recipe

      gloss eval --recipe paper                    # GLoSS's protocol: top-1 per generated title, history kept

      gloss eval --recipe lis-paper                # the Last-Item-Search baseline under the same protocol

      gloss eval --recipe "lists=lis,model queries=5" --retriever e5

      gloss eval --recipe "transitions users=all"  # the no-model list on every user of the split

      gloss eval --recipe sasrec -k 5 -k 10        # after 'gloss sasrec': the item-ID anchor, every user

      gloss eval --recipe paper --queries llama-1b_test.json -k 5 -k 10

      gloss eval --recipe rerank                   # after 'gloss rerank'
    """
    from gloss_cli.evaluate import run
    from gloss_cli.project import Project

    chosen = recipe_of(recipe)
    _refuse_flags_that_do_not_apply(chosen)
    reporter = RichReporter(quiet)
    proj = Project(project)
    if not chosen.reranked:  # the cut-off within the catalog, the retrieval within the free memory, before any work
        from gloss_cli.limits import check_retrieval
        from gloss_cli.ranking import MAX_SEEN_EXTRA, query_depth

        queries = ("lis" in chosen.lists) + chosen.queries
        check_retrieval(
            proj.root,
            split,
            max(k or [5]),
            queries=max(queries, 1),
            depth=query_depth(chosen, max(k or [5])) + (MAX_SEEN_EXTRA if chosen.exclude_seen else 0)
            if queries
            else None,
            option="-k",
        )
    command = f"gloss eval --recipe '{chosen.explicit()}' --retriever {retriever} --split {split}"
    command += f" --queries {queries_file}" if queries_file else ""
    with proj.lock(command, reporter):
        result = run(
            proj,
            chosen,
            split=split,
            retriever=retriever,
            encoder=encoder,
            ks=k,
            queries_file=queries_file,
            name=name,
            command=command,
            reporter=reporter,
        )
    if json_:
        print_json({"project": str(proj.root), **result.as_dict()})
        return
    from gloss_cli.render import eval_table

    eval_table(result)
