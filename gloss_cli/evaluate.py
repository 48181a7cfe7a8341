"""`gloss eval`: rank each user's recommendations with a recipe (``gloss_cli.recipe``) and score them against the
held-out item: Recall@K, NDCG@K, MRR@K with bootstrap CIs over users.

The ranking itself is ``gloss_cli.ranking``'s, shared with ``gloss rerank`` and ``gloss recommend``. A run's name
derives from its recipe, retriever and split (``gloss-bm25-test``); its record holds the recipe as data.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import polars as pl

from gloss_cli.console import Reporter
from gloss_cli.data import load_items, load_split, tie_policy
from gloss_cli.errors import GlossError
from gloss_cli.fusion import RRF_C
from gloss_cli.index import open_index
from gloss_cli.metrics import bootstrap_ci, per_user, target_ranks
from gloss_cli.project import Project, StageRun, sha256_file
from gloss_cli.queries import QuerySet, lis_queries, load_generated, load_gloss_json, query_text, read_generated
from gloss_cli.ranking import (
    CANDIDATES,
    TIE_ORDER,
    TRANSITIONS_PARAMS,
    TRANSITIONS_TEXT,
    as_array,
    rank_users,
    rerank_stage,
    reranked,
    transitions_lists,
)
from gloss_cli.recipe import DEFAULT, PRESETS, Recipe
from gloss_cli.retrieval import hybrid_parts


@dataclass
class EvalResult:
    name: str
    recipe: Recipe
    split: str
    retriever: str  # the index key, "none" for lists ranked without retrieval (transitions, sasrec)
    source: str  # where the model list's queries came from: generate/<split>, file:<name>, rerank/..., or ""
    ks: list[int]
    users: int
    metrics: dict[str, float]
    ci: dict[str, tuple[float, float]]
    folder: Path
    notes: list[str] = field(default_factory=list)
    # The order of a user's same-day items, which decides targets and histories (gloss data --ties): data.tie_policy
    ties: str = "same-day ties in file order"

    @property
    def exclude_seen(self) -> bool:
        return self.recipe.exclude_seen

    def describe(self) -> str:
        from_file = self.source.startswith("file:")
        label = f"({self.source}) generated" if from_file else "generated"
        users = f"the users of {self.source.removeprefix('file:')}" if from_file else None
        text = self.recipe.describe(generated_label=label, users_label=users)
        if "sasrec" in self.recipe.lists:
            text += f"; sasrec: {SASREC_TEXT}"
        if "transitions" in self.recipe.lists:
            text += f"; transitions: {TRANSITIONS_TEXT} (the train split's)"
        retrieval = f"; retriever {self.retriever}" if self.retriever != "none" else ""
        return (
            f"{text}{retrieval}; {self.ties}; {TIE_ORDER}; split {self.split}; {self.users:,} users; mean over users, "
            "one held-out item each; 95% CI: bootstrap over users"
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "run": self.name,
            "recipe": self.recipe.as_dict(),
            "protocol_description": self.describe(),
            "split": self.split,
            "retriever": self.retriever,
            "source": self.source,
            "users": self.users,
            "k": self.ks,
            "exclude_seen": self.exclude_seen,
            "metrics": self.metrics,
            "ci95": self.ci,
            "notes": self.notes,
            "folder": str(self.folder),
        }


def load_queries(
    project: Project,
    split: str,
    split_df: pl.DataFrame,
    titles: dict[str, str],
    *,
    queries_file: Path | None,
    n: int,
) -> tuple[QuerySet, tuple[str, ...]]:
    """The model list's queries (``gloss generate``'s stage, or ``queries_file``) and the stage records they depend
    on."""
    if queries_file is not None:
        if is_generated_file(queries_file):  # a missing file or a folder: one line from queries._read_text
            return load_generated(queries_file, split_df, titles, f"file:{queries_file.name}", n), ()
        return load_gloss_json(queries_file, split_df, titles, n), ()
    stage = f"generate/{split}"
    project.require(stage, f"gloss generate --split {split}")
    path = project.path(f"{stage}/queries.jsonl")
    return load_generated(path, split_df, titles, stage, n), (stage,)


def is_generated_file(path: Path | None) -> bool:
    """Whether ``--queries`` names gloss generate's own JSONL (e.g. from another project or a cut-off run) rather
    than a GLoSS JSON file."""
    return path is not None and path.suffix == ".jsonl"


def with_lis_query(qs: QuerySet, titles: dict[str, str]) -> QuerySet:
    """The query set with each user's LIS query (the last history item's title) put first: fused, it weighs most,
    and the generated queries add what the last item alone does not find."""
    queries = [[query_text(titles[h[-1]]), *q] if h else list(q) for h, q in zip(qs.histories, qs.queries, strict=True)]
    return dataclasses.replace(qs, source=qs.source + "+lis", queries=queries)


def generated_users(project: Project, split: str, queries_file: Path | None = None) -> list[str]:
    """The users of a gloss queries JSONL: ``queries_file`` if it is one, else the project's generate stage."""
    if queries_file is not None and is_generated_file(queries_file):  # (None check: for the type checker)
        path = queries_file
    else:
        stage = f"generate/{split}"
        project.require(stage, f"gloss generate --split {split}")
        path = project.path(f"{stage}/queries.jsonl")
    try:  # the file's schema: a user_id that is a list or null is an error, not a user
        return [entry.user_id for _, entry in read_generated(path)]
    except GlossError as exc:
        raise GlossError(f"Cannot read the users of {path}: {exc.message}", exc.hint) from None


def write_outputs(
    folder: Path, name: str, qs: QuerySet, ranked: npt.NDArray[np.int64], item_ids: list[str], ks: list[int]
) -> dict[str, Any]:
    key_of = {item: i for i, item in enumerate(item_ids)}
    ranks = target_ranks(ranked, np.array([key_of[t] for t in qs.targets]))
    values = per_user(ranks, ks)
    pl.DataFrame(
        {
            "user_id": qs.users,
            "target": qs.targets,
            "rank": np.where(ranks >= 0, ranks + 1, 0),
            **values,
            "n_recommended": (ranked >= 0).sum(axis=1),
        }
    ).write_parquet(folder / "per_user.parquet")
    with (folder / "run.trec").open("w", encoding="utf-8") as fh:
        for user, row in zip(qs.users, ranked.tolist(), strict=True):
            for rank, key in enumerate(r for r in row if r >= 0):
                # TREC wants higher = better scores: use the reciprocal rank of gloss's own ordering.
                fh.write(f"{user} Q0 {item_ids[key]} {rank + 1} {1.0 / (rank + 1):.6f} {name}\n")
    with (folder / "qrels.trec").open("w", encoding="utf-8") as fh:
        fh.writelines(f"{user} 0 {target} 1\n" for user, target in zip(qs.users, qs.targets, strict=True))
    return values


TRAIN_TRANSITIONS = TRANSITIONS_PARAMS | {"counted_from": "train split"}  # an evaluation knows the train split only
# (gloss_cli.sasrec.DESCRIPTION, without importing torch for recipes that have no sasrec list)
SASREC_TEXT = "SASRec over item ids (gloss sasrec; trained on the train split, its settings chosen on validation)"


def recipe_queries(
    project: Project,
    recipe: Recipe,
    split: str,
    split_df: pl.DataFrame,
    titles: dict[str, str],
    queries_file: Path | None = None,
) -> tuple[QuerySet, str, tuple[str, ...]]:
    """The users a recipe ranks and their query texts in its order (the last item's title, then the model's), where
    the model's queries came from (``generate/<split>``, ``file:<name>`` or ""), and the stages they depend on."""
    stages: tuple[str, ...] = ()
    if recipe.users == "generated" and not recipe.uses_model:
        # the users that `gloss generate` covered (or the file's), so that every row compares like with like
        split_df = split_df.filter(pl.col("user_id").is_in(generated_users(project, split, queries_file)))
        stages = () if is_generated_file(queries_file) else (f"generate/{split}",)
    if recipe.uses_model:
        qs, stages = load_queries(project, split, split_df, titles, queries_file=queries_file, n=recipe.queries)
        source = qs.source
        if "lis" in recipe.lists:
            qs = with_lis_query(qs, titles)
        return qs, source, stages
    source = f"file:{queries_file.name}" if queries_file is not None else ""  # the file's users
    qs = lis_queries(split_df, titles)
    if "lis" not in recipe.lists:
        qs = dataclasses.replace(qs, source="", queries=[])
    return qs, source, stages


def lead_list(
    project: Project, recipe: Recipe, qs: QuerySet, key_of: dict[str, int], *, depth: int
) -> npt.NDArray[np.int64] | None:
    """The recipe's lists ranked without retrieval, per user of ``qs``, in the recipe's order: (users, lists,
    depth), -1 padded, or None without any. ``sasrec``: the model 'gloss sasrec' trained on the train split;
    ``transitions``: counted from the train split."""
    leads = []
    if "sasrec" in recipe.lists:
        from gloss_cli import sasrec

        leads.append(sasrec.lists(project, qs.histories, key_of, depth=depth, exclude_seen=recipe.exclude_seen))
    if "transitions" in recipe.lists:
        from gloss_cli.transitions import transition_counts

        counts = transition_counts(load_split(project.path("data"), "train"))
        leads.append(transitions_lists(counts, qs.histories, key_of, depth=depth, exclude_seen=recipe.exclude_seen))
    return np.stack(leads, axis=1) if leads else None


def run(
    project: Project,
    recipe: Recipe | None = None,
    *,
    split: str = "test",
    retriever: str = "bm25",
    encoder: str | None = None,
    ks: list[int] | None = None,
    queries_file: Path | None = None,
    name: str | None = None,
    command: str = "gloss eval",
    reporter: Reporter | None = None,
) -> EvalResult:
    """Rank with ``recipe`` (default: the pick docs/RESULTS.md reports) and score; writes eval/<name>/."""
    reporter = reporter or Reporter()
    recipe = recipe or PRESETS[DEFAULT]
    ks = sorted(set(ks or [5]))
    _check_split_and_k(split, ks)
    if queries_file is not None and not recipe.uses_model and recipe.users != "generated":
        raise GlossError(
            f"--queries gives the model's queries, or the users to score: recipe {recipe.name()} reads neither.",
            "Drop --queries, or use a recipe with model in lists or users=generated.",
        )
    if queries_file is not None and not recipe.uses_model and not is_generated_file(queries_file):
        raise GlossError(
            f"Recipe {recipe.name()} reads no queries, and a GLoSS JSON file gives no users of its own here.",
            "Use a recipe with model in lists, or pass gloss generate's queries.jsonl to score its users.",
        )
    if recipe.reranked:
        if queries_file is not None:
            raise GlossError(
                f"--queries does not apply to recipe {recipe.name()}: it orders the pools 'gloss rerank' scored.",
                "Drop --queries.",
            )
        return _run_reranked(project, recipe, split, retriever, ks, name=name, command=command)
    if recipe.retrieves:
        hybrid_parts(retriever)  # a malformed hybrid name fails before any work
    sasrec_record = None
    if "sasrec" in recipe.lists:  # no model, or one trained on other data: one line before any work
        from gloss_cli.sasrec import require

        sasrec_record = require(project)
    ties = tie_policy(project.require("data"))
    items = load_items(project.path("data"))
    item_ids = items.get_column("item_id").to_list()
    titles = dict(zip(item_ids, items.get_column("title").to_list(), strict=True))
    split_df = load_split(project.path("data"), split)
    split_users = split_df.height
    qs, source, query_stages = recipe_queries(project, recipe, split, split_df, titles, queries_file)
    subset = f"-{len(qs.users)}u" if len(qs.users) < split_users else ""  # never mix subset and full-split names
    # A run that read a --queries file (its queries, or its users) carries a short hash of the file's content: two
    # files never share a run name, so the second never overwrites the first.
    if queries_file is not None:
        subset += f"-{sha256_file(queries_file)[:8]}"
    key_of = {item: i for i, item in enumerate(item_ids)}
    index = None
    meta: dict[str, Any] = {"key": "none", "stages": ()}
    if qs.per_user:
        index, meta = open_index(project, retriever, encoder=encoder, query_cache=True, reporter=reporter)
    name = name or (f"{recipe.name()}{'' if index is None else '-' + meta['key']}-{split}{subset}".replace("/", "_"))
    params = {
        "split": split,
        "recipe": recipe.as_dict(),
        "retriever": meta["key"] if index is not None else None,
        "ks": ks,
        "queries": qs.source or None,
        "queries_per_user": qs.per_user,
        "rrf_c": RRF_C if recipe.merge == "rrf" else None,
        "transitions": TRAIN_TRANSITIONS if "transitions" in recipe.lists else None,
        "sasrec": sasrec_record["params"] | {"metrics": sasrec_record["metrics"]} if sasrec_record else None,
    }
    if meta.get("fallback"):
        params["encoder_fallback"] = meta["fallback"]
    upstream = tuple(dict.fromkeys(("data", *meta["stages"], *query_stages, *(("sasrec",) if sasrec_record else ()))))
    libraries: tuple[str, ...] = ("bm25s", "numpy") if index is not None else ("polars", "numpy")
    libraries += ("torch",) if sasrec_record else ()
    with project.run_stage(f"eval/{name}", params, command=command, upstream=upstream, libraries=libraries) as stage:
        k = max(ks)
        lead = lead_list(project, recipe, qs, key_of, depth=k)
        seen = [{key_of[i] for i in h} for h in qs.histories]
        merged = rank_users(recipe, qs.queries, seen, k=k, retriever=index, lead=lead, reporter=reporter)
        result = _record(
            stage,
            name,
            qs,
            as_array(merged, k),
            item_ids,
            params,
            lambda metrics, ci: EvalResult(
                name,
                recipe,
                split,
                meta["key"],
                source,
                ks,
                len(qs.users),
                metrics,
                ci,
                stage.dir,
                ties=ties,
            ),
            retriever_description=meta.get("resolved", index.description) if index is not None else None,
        )
        if meta.get("fallback"):
            result.notes.append(meta["fallback"])
    result.folder = project.path(f"eval/{name}")
    return result


def _record(
    stage: StageRun,
    name: str,
    qs: QuerySet,
    ranked: npt.NDArray[np.int64],
    item_ids: list[str],
    params: dict[str, Any],
    result_of: Callable[[dict[str, float], dict[str, tuple[float, float]]], EvalResult],
    **extra: Any,
) -> EvalResult:
    """An eval stage's outputs for ``ranked`` (per-user metrics, TREC files, metrics.json) and its result."""
    ks = params["ks"]
    values = write_outputs(stage.dir, name, qs, ranked, item_ids, ks)
    metrics = {m: float(v.mean()) for m, v in values.items()}
    ci = {f"recall@{k}": bootstrap_ci(values[f"recall@{k}"]) for k in ks}
    result = result_of(metrics, ci)
    summary = {
        "name": name,
        "protocol_description": result.describe(),
        **params,
        "users": len(qs.users),
        "metrics": metrics,
        "ci95": ci,
        **extra,
    }
    (stage.dir / "metrics.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    stage.metrics = {"users": len(qs.users), **metrics}
    return result


def _check_split_and_k(split: str, ks: list[int]) -> None:
    if split not in ("validation", "test"):
        raise GlossError(f"Cannot evaluate on split '{split}'.", "Use --split test or --split validation.")
    if min(ks) < 1:
        raise GlossError(f"K must be at least 1, got {min(ks)}.", "Pass -k 5 (or several: -k 5 -k 10).")


def _run_reranked(
    project: Project, recipe: Recipe, split: str, retriever: str, ks: list[int], *, name: str | None, command: str
) -> EvalResult:
    """Order the pools ``gloss rerank --recipe RECIPE --retriever RETRIEVER`` scored for ``split``."""
    ties = tie_policy(project.require("data"))
    stage = rerank_stage(split, recipe, retriever)  # a malformed hybrid name fails here
    record = project.require(
        stage, f"gloss rerank --split {split} --retriever {retriever} --recipe '{recipe.explicit()}'"
    )
    frame = pl.read_parquet(project.path(f"{stage}/{CANDIDATES}"))
    items = load_items(project.path("data"))
    item_ids = items.get_column("item_id").to_list()
    key_of = {item: i for i, item in enumerate(item_ids)}
    titles = dict(zip(item_ids, items.get_column("title").to_list(), strict=True))
    # the users gloss rerank scored, chosen as it chose them: a user whose pool was empty has no row in the frame
    # and counts as a miss (leaving them out made "every user" fewer than every user)
    scored, _, _ = recipe_queries(project, recipe, split, load_split(project.path("data"), split), titles)
    users = scored.users
    if len(users) != record["metrics"].get("users", len(users)) or not set(frame["user_id"].unique()) <= set(users):
        raise GlossError(
            f"The pools in {stage} were scored for other users than recipe {recipe.name()} covers now.",
            f"Run gloss rerank --split {split} --retriever {retriever} --recipe '{recipe.explicit()}' again.",
        )
    qs = QuerySet(stage, users, scored.targets, scored.histories, [])
    pool = record["params"]
    name = name or f"{recipe.name()}-{pool['retriever']}-{split}".replace("/", "_")
    params = {
        "split": split,
        "recipe": recipe.as_dict(),
        "retriever": pool["retriever"],
        "ks": ks,
        "queries": stage,
        "queries_per_user": recipe.queries,
        "candidates": recipe.candidates,
        "rrf_c": RRF_C,
        "transitions": pool.get("transitions"),
        "sasrec": pool.get("sasrec"),
    }
    with project.run_stage(
        f"eval/{name}", params, command=command, upstream=("data", stage), libraries=("numpy",)
    ) as run_:
        ranked = reranked(frame, users, key_of, order=recipe.order, k=max(ks))
        result = _record(
            run_,
            name,
            qs,
            ranked,
            item_ids,
            params,
            lambda metrics, ci: EvalResult(
                name, recipe, split, pool["retriever"], stage, ks, len(users), metrics, ci, run_.dir, ties=ties
            ),
        )
    result.folder = project.path(f"eval/{name}")
    return result
