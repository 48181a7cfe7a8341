"""`gloss eval`: retrieve with generated (or LIS) queries, rank, and score against the held-out item.

Protocols:

* ``paper`` (GLoSS exactly): each generated query keeps its top-1 item; items found by several queries collapse
  into one with the highest score; the list is sorted by retrieval score, so it may hold fewer than K items.
  For LIS (one query) the list is the query's top-K, which can contain the query item itself.
* ``fused`` (gloss): each query retrieves its top-K; the lists are merged by reciprocal-rank fusion weighted by
  beam rank, duplicates removed; the list is filled to K.

``exclude_seen`` drops the user's history items from every query's results before either protocol.

``with_transitions`` puts a collaborative list first in the fusion: the items that followed the user's recent items in
the training sequences (``gloss_cli.transitions``); ``baseline="transitions"`` is that list alone.

``rerank`` (after ``gloss rerank``) ranks each user's pool of candidates (the fused list of the LIS query and the
first generated queries, history excluded) by the fine-tuned model's log-probability of each title: ``lm`` by
log-probability per token (as beam scores are normalised), ``fused`` by reciprocal-rank fusion of the pool's order
and the model's order (equal weights, the same offset c as ``fused``).
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
from gloss_cli.index import open_index
from gloss_cli.metrics import bootstrap_ci, per_user, target_ranks
from gloss_cli.project import Project, StageRun, sha256_file
from gloss_cli.queries import QuerySet, lis_queries, load_generated, load_gloss_json, query_text, read_generated
from gloss_cli.retrieval import Retriever, hybrid_parts
from gloss_cli.transitions import DECAY, RECENT, WINDOW

PROTOCOLS = ("paper", "fused")
BASELINES = ("lis", "transitions")
RERANKS = ("lm", "fused")
# How equal scores are ordered (gloss_cli.retrieval.top_k and the merges below), named in every description: a
# retriever's ties go by item id, a fusion's to the item found first (the earlier list or query).
TIE_ORDER = "equal scores: retrieval by item id, fusion by the list that found the item first"
RRF_K = 1.0  # rank offset c in w / (c + rank): small, so a query's top items dominate its tail
MAX_SEEN_EXTRA = 100  # extra depth retrieved per query so that excluded history items can be replaced
TRANSITIONS_PARAMS = {"window": WINDOW, "recent": RECENT, "decay": DECAY, "counted_from": "train split"}
TRANSITIONS_TEXT = (
    f"the items that followed the user's {RECENT} most recent items within {WINDOW} places in the training sequences, "
    f"weighted 1/gap, each older item's votes times {DECAY:g}"
)


@dataclass
class EvalResult:
    name: str
    protocol: str
    split: str
    retriever: str
    source: str
    ks: list[int]
    users: int
    exclude_seen: bool
    metrics: dict[str, float]
    ci: dict[str, tuple[float, float]]
    folder: Path
    notes: list[str] = field(default_factory=list)
    rerank: dict[str, Any] | None = None  # how, candidates, num_queries (gloss eval --rerank)
    # The order of a user's same-day items, which decides targets and histories (gloss data --ties): data.tie_policy
    ties: str = "same-day ties in file order"
    generated: int = 0  # the model's (or a file's) queries per user that the run used

    def describe(self) -> str:
        if self.rerank is not None:
            order = {
                "lm": "the model's log-probability per title token",
                "fused": f"reciprocal-rank fusion (c={RRF_K:g}) of the pool's order and the model's order",
            }[self.rerank["how"]]
            lead = f"the transitions list ({TRANSITIONS_TEXT}), " if self.rerank.get("transitions") else ""
            return (
                f"rerank {self.rerank['how']}: each user's top-{self.rerank['candidates']} pool ({lead}the last item's "
                f"title then {self.rerank['num_queries']} generated queries, top-K each, fused), ordered by {order}; "
                f"history items excluded; {self.ties}; {TIE_ORDER}; split {self.split}; {self.users:,} users; "
                "mean over users, one held-out item each; 95% CI: bootstrap over users"
            )
        seen = "history items excluded" if self.exclude_seen else "history items kept (may be recommended)"
        tail = (
            f"{seen}; {self.ties}; {TIE_ORDER}; split {self.split}; {self.users:,} users; mean over users, one "
            "held-out item each; 95% CI: bootstrap over users"
        )
        if self.source == "transitions":
            return f"baseline transitions: {TRANSITIONS_TEXT}, top-K by summed weight; {tail}"
        if self.protocol == "paper":
            how = "top-1 per query, duplicates merged, sorted by score (lists may be shorter than K)"
            if self.source == "lis":
                how = "top-K of the last item's title"
        else:
            how = f"top-K per query fused by beam-weighted reciprocal rank (c={RRF_K:g}), filled to K"
        parts = self.source.split("+")  # [transitions+](model|file|lis)[+lis]
        lists = [f"the transitions list ({TRANSITIONS_TEXT})"] if parts[0] == "transitions" else []
        lists += ["the last item's title"] if parts[-1] == "lis" else []
        if {"model", "file"} & set(parts):
            n = self.generated
            lists += [f"the first {n} generated quer{'y' if n == 1 else 'ies'}" if n else "the generated queries"]
        if len(lists) > 1:
            how = f"lists in order: {', then '.join(lists)}; " + how
        return f"protocol {self.protocol}: {how}; {tail}"


def merge_user(
    keys: npt.NDArray[np.int64], scores: npt.NDArray[np.float32], seen: set[int], *, protocol: str, depth: int
) -> list[tuple[int, float, int]]:
    """One user's merged list: (item key, value, index of the first query that found it), best first.

    keys/scores: (queries, retrieved), each query's results best first (equal scores by key, as retrievers return
    them). Equal values go to the item found first: by the earlier query, then at the better rank in it (GLoSS's own
    merge keeps that order: a stable sort of the items as found). No two items are found at the same place, so the
    order is total.
    """
    best: dict[int, float] = {}
    found_at: dict[int, tuple[int, int]] = {}  # (query, rank among its kept items)
    for q in range(keys.shape[0]):
        taken = 0
        for key, score in zip(keys[q].tolist(), scores[q].tolist(), strict=True):
            if taken == depth:
                break
            if key < 0 or key in seen:
                continue
            taken += 1
            found_at.setdefault(key, (q, taken))
            if protocol == "paper":  # keep the highest retrieval score
                best[key] = max(best.get(key, score), score)
            else:  # add beam-weighted reciprocal ranks
                best[key] = best.get(key, 0.0) + (1.0 / (q + 1)) / (RRF_K + taken)
    order = sorted(best, key=lambda key: (-best[key], found_at[key]))
    return [(key, best[key], found_at[key][0]) for key in order]


def rank_items(
    keys: npt.NDArray[np.int64],
    scores: npt.NDArray[np.float32],
    seen: list[set[int]],
    *,
    protocol: str,
    depth: int,
    k: int,
) -> npt.NDArray[np.int64]:
    """Per user, the ranked item keys (n, k), -1 padded. keys/scores: (n, queries, retrieved) best first."""
    ranked = np.full((keys.shape[0], k), -1, dtype=np.int64)
    for u in range(keys.shape[0]):
        order = [key for key, _, _ in merge_user(keys[u], scores[u], seen[u], protocol=protocol, depth=depth)[:k]]
        ranked[u, : len(order)] = order
    return ranked


def retrieve(
    retriever: Retriever,
    qs: QuerySet,
    key_of: dict[str, int],
    *,
    protocol: str,
    exclude_seen: bool,
    k: int,
    reporter: Reporter,
    lead: npt.NDArray[np.int64] | None = None,
) -> npt.NDArray[np.int64]:
    """Per user, the ranked item keys (n, k). ``lead`` (n, m), -1 padded: a ranked list per user fused before the
    queries' lists (the transitions list), as if it were the first query's."""
    is_lis = qs.source == "lis"
    depth = k if (protocol == "fused" or is_lis) else 1
    seen = [{key_of[i] for i in h} for h in qs.histories] if exclude_seen else [set() for _ in qs.histories]
    extra = min(max((len(s) for s in seen), default=0), MAX_SEEN_EXTRA)
    flat = [text for queries in qs.queries for text in queries]
    with reporter.progress(f"retrieve ({retriever.name})", len(flat)) as tick:
        keys, scores = retriever.search(flat, depth + extra, tick=tick)
    shape = (len(qs.users), qs.per_user, keys.shape[1])
    keys, scores = keys.reshape(shape), scores.reshape(shape)
    if lead is not None:
        keys, scores = with_lead_list(keys, scores, lead)
    return rank_items(keys, scores, seen, protocol=protocol, depth=depth, k=k)


def with_lead_list(
    keys: npt.NDArray[np.int64], scores: npt.NDArray[np.float32], lead: npt.NDArray[np.int64]
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]:
    """keys/scores (n, queries, m) with ``lead`` (n, m'), -1 padded, put first as if it were the first query's list
    (cut or padded to m; its scores 0: the fused protocol reads ranks only)."""
    first = np.full((keys.shape[0], 1, keys.shape[2]), -1, dtype=keys.dtype)
    width = min(lead.shape[1], keys.shape[2])
    first[:, 0, :width] = lead[:, :width]
    return (
        np.concatenate([first, keys], axis=1),
        np.concatenate([np.zeros(first.shape, dtype=scores.dtype), scores], axis=1),
    )


def padded_keys(lists: list[list[str]], key_of: dict[str, int], depth: int) -> npt.NDArray[np.int64]:
    """Item-id lists as an (n, depth) array of item keys, -1 padded (each list cut to ``depth``)."""
    out = np.full((len(lists), depth), -1, dtype=np.int64)
    for u, row in enumerate(lists):
        out[u, : min(len(row), depth)] = [key_of[i] for i in row[:depth]]
    return out


def transitions_lists(
    project: Project, qs: QuerySet, key_of: dict[str, int], *, depth: int, exclude_seen: bool
) -> npt.NDArray[np.int64]:
    """Per user of ``qs``, the transitions list's first ``depth`` item keys, -1 padded."""
    from gloss_cli.transitions import recommend, transition_counts

    counts = transition_counts(load_split(project.path("data"), "train"))
    return padded_keys(recommend(counts, qs.histories, depth=depth, exclude_seen=exclude_seen), key_of, depth)


def reranked(
    frame: pl.DataFrame, users: list[str], key_of: dict[str, int], *, how: str, k: int
) -> npt.NDArray[np.int64]:
    """Per user (in ``users`` order), the top-``k`` item keys of its reranked pool, -1 padded.

    Equal values, in the model's order (``lm_rank``) as in the final one, go to the better pool rank (unique per
    user), so the order is total and never depends on the frame's row order.
    """
    fused = 1.0 / (RRF_K + pl.col("pool_rank")) + 1.0 / (RRF_K + pl.col("lm_rank"))
    top = (
        frame.with_columns(per_token=pl.col("logprob") / pl.col("tokens"))
        .sort(["user_id", "per_token", "pool_rank"], descending=[False, True, False])
        .with_columns(lm_rank=pl.int_range(1, pl.len() + 1).over("user_id"))
        .with_columns(value=pl.col("per_token") if how == "lm" else fused)
        .sort(["user_id", "value", "pool_rank"], descending=[False, True, False])
        .group_by("user_id", maintain_order=True)
        .head(k)
        .group_by("user_id", maintain_order=True)
        .agg(pl.col("item_id"))
    )
    lists = dict(zip(top.get_column("user_id").to_list(), top.get_column("item_id").to_list(), strict=True))
    ranked = np.full((len(users), k), -1, dtype=np.int64)
    for u, user in enumerate(users):
        row = [key_of[i] for i in lists.get(user, [])]
        ranked[u, : len(row)] = row
    return ranked


def load_queries(
    project: Project,
    split: str,
    split_df: pl.DataFrame,
    titles: dict[str, str],
    *,
    queries_file: Path | None,
    baseline: str | None,
    n: int,
) -> tuple[QuerySet, tuple[str, ...]]:
    """The query set and the stage records it depends on."""
    if baseline is not None:
        if baseline not in BASELINES:
            raise GlossError(f"Unknown baseline '{baseline}'.", f"Use one of: {', '.join(BASELINES)}.")
        qs = lis_queries(split_df, titles)
        return (dataclasses.replace(qs, source="transitions", queries=[]) if baseline == "transitions" else qs), ()
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


def run(
    project: Project,
    *,
    split: str = "test",
    retriever: str = "bm25",
    encoder: str | None = None,
    ks: list[int] | None = None,
    protocol: str = "paper",
    exclude_seen: bool = False,
    queries_file: Path | None = None,
    baseline: str | None = None,
    num_queries: int = 5,
    match_generated: bool = False,
    with_lis: bool = False,
    with_transitions: bool = False,
    rerank: str | None = None,
    name: str | None = None,
    command: str = "gloss eval",
    reporter: Reporter | None = None,
) -> EvalResult:
    reporter = reporter or Reporter()
    ks = sorted(set(ks or [5]))
    if rerank is not None:
        if baseline or queries_file or match_generated or protocol != "paper" or encoder:
            raise GlossError(
                "--rerank orders the pools 'gloss rerank' made: their queries and protocol were set there.",
                "Drop --baseline, --queries, --match-generated, --protocol and --encoder (gloss rerank takes "
                "--num-queries and --candidates; --retriever and --with-transitions pick whose pools to order).",
            )
        return _run_reranked(
            project, split, rerank, retriever, ks, transitions=with_transitions, name=name, command=command
        )
    if protocol not in PROTOCOLS:
        raise GlossError(f"Unknown protocol '{protocol}'.", f"Use one of: {', '.join(PROTOCOLS)}.")
    _check_split_and_k(split, ks)
    if with_transitions and (protocol != "fused" or baseline == "transitions"):
        raise GlossError(
            "--with-transitions fuses the transitions list with the queries' lists.",
            "Use --protocol fused, with generated queries or --baseline lis (--baseline transitions is the list "
            "alone).",
        )
    hybrid_parts(retriever)  # a malformed hybrid name fails before any work
    ties = tie_policy(project.require("data"))
    items = load_items(project.path("data"))
    item_ids = items.get_column("item_id").to_list()
    titles = dict(zip(item_ids, items.get_column("title").to_list(), strict=True))
    split_df = load_split(project.path("data"), split)
    split_users = split_df.height
    extra_stages: tuple[str, ...] = ()
    if match_generated:  # the users that `gloss generate` covered, so that a baseline compares like with like
        split_df = split_df.filter(pl.col("user_id").is_in(generated_users(project, split, queries_file)))
        extra_stages = () if is_generated_file(queries_file) else (f"generate/{split}",)
    qs, query_stages = load_queries(
        project, split, split_df, titles, queries_file=queries_file, baseline=baseline, n=num_queries
    )
    if with_lis:
        if baseline:
            raise GlossError("--with-lis adds the LIS query to generated ones.", f"Drop --baseline {baseline}.")
        qs = with_lis_query(qs, titles)
    subset = f"-{len(qs.users)}u" if len(qs.users) < split_users else ""  # never mix subset and full-split names
    # A run that read a --queries file (its queries, or its users) carries a short hash of the file's content: two
    # files never share a run name, so the second never overwrites the first.
    if queries_file is not None and (baseline is None or (match_generated and is_generated_file(queries_file))):
        subset += f"-{sha256_file(queries_file)[:8]}"
    key_of = {item: i for i, item in enumerate(item_ids)}
    if qs.source == "transitions":
        return _run_transitions(
            project,
            qs,
            key_of,
            item_ids,
            split,
            ks,
            exclude_seen,
            name=name or f"transitions{'-xseen' if exclude_seen else ''}-{split}{subset}",
            upstream=("data", *extra_stages),
            command=command,
        )
    index, meta = open_index(project, retriever, encoder=encoder, query_cache=True, reporter=reporter)
    source = "lis" if qs.source == "lis" else ("model" if qs.source.startswith("generate") else "file")
    source += "+lis" if with_lis else ""
    source = ("transitions+" if with_transitions else "") + source
    name = name or f"{source}-{meta['key']}-{protocol}{'-xseen' if exclude_seen else ''}-{split}{subset}"
    params = {
        "split": split,
        "retriever": meta["key"],
        "protocol": protocol,
        "ks": ks,
        "exclude_seen": exclude_seen,
        "queries": qs.source,
        "queries_per_user": qs.per_user,
        "rrf_k": RRF_K if protocol == "fused" else None,
        "with_lis": with_lis,
        "transitions": TRANSITIONS_PARAMS if with_transitions else None,
    }
    if meta.get("fallback"):
        params["encoder_fallback"] = meta["fallback"]
    upstream = tuple(dict.fromkeys(("data", *meta["stages"], *query_stages, *extra_stages)))
    with project.run_stage(
        f"eval/{name}", params, command=command, upstream=upstream, libraries=("bm25s", "numpy")
    ) as stage:
        lead = (
            transitions_lists(project, qs, key_of, depth=max(ks), exclude_seen=exclude_seen)
            if with_transitions
            else None
        )
        ranked = retrieve(
            index, qs, key_of, protocol=protocol, exclude_seen=exclude_seen, k=max(ks), reporter=reporter, lead=lead
        )
        result = _record(
            stage,
            name,
            qs,
            ranked,
            item_ids,
            params,
            lambda metrics, ci: EvalResult(
                name,
                protocol,
                split,
                meta["key"],
                source,
                ks,
                len(qs.users),
                exclude_seen,
                metrics,
                ci,
                stage.dir,
                ties=ties,
                generated=qs.per_user - (1 if with_lis else 0) if qs.source != "lis" else 0,
            ),
            retriever_description=meta.get("resolved", index.description),
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


def _run_transitions(
    project: Project,
    qs: QuerySet,
    key_of: dict[str, int],
    item_ids: list[str],
    split: str,
    ks: list[int],
    exclude_seen: bool,
    *,
    name: str,
    upstream: tuple[str, ...],
    command: str,
) -> EvalResult:
    """``gloss eval --baseline transitions``: the transitions list alone, no retrieval."""
    params = {
        "split": split,
        "retriever": None,
        "protocol": "transitions",
        "ks": ks,
        "exclude_seen": exclude_seen,
        "queries": "transitions",
        "transitions": TRANSITIONS_PARAMS,
    }
    with project.run_stage(f"eval/{name}", params, command=command, upstream=upstream, libraries=("polars",)) as stage:
        ranked = transitions_lists(project, qs, key_of, depth=max(ks), exclude_seen=exclude_seen)
        result = _record(
            stage,
            name,
            qs,
            ranked,
            item_ids,
            params,
            lambda metrics, ci: EvalResult(
                name,
                "transitions",
                split,
                "none",
                "transitions",
                ks,
                len(qs.users),
                exclude_seen,
                metrics,
                ci,
                stage.dir,
                ties=tie_policy(project.stage("data")),
            ),
        )
    result.folder = project.path(f"eval/{name}")
    return result


def _check_split_and_k(split: str, ks: list[int]) -> None:
    if split not in ("validation", "test"):
        raise GlossError(f"Cannot evaluate on split '{split}'.", "Use --split test or --split validation.")
    if min(ks) < 1:
        raise GlossError(f"K must be at least 1, got {min(ks)}.", "Pass -k 5 (or several: -k 5 -k 10).")


def _run_reranked(
    project: Project,
    split: str,
    how: str,
    retriever: str,
    ks: list[int],
    *,
    transitions: bool,
    name: str | None,
    command: str,
) -> EvalResult:
    """``gloss eval --rerank``: order the pools ``gloss rerank --retriever RETRIEVER [--with-transitions]`` wrote
    for ``split``."""
    from gloss_cli.rerank import CANDIDATES, stage_name

    if how not in RERANKS:
        raise GlossError(f"Unknown rerank order '{how}'.", f"Use one of: {', '.join(RERANKS)}.")
    _check_split_and_k(split, ks)
    ties = tie_policy(project.require("data"))
    stage = stage_name(split, retriever, transitions=transitions)  # a malformed hybrid name fails here
    also = " --with-transitions" if transitions else ""
    record = project.require(stage, f"gloss rerank --split {split} --retriever {retriever}{also}")
    pool = record["params"]
    frame = pl.read_parquet(project.path(f"{stage}/{CANDIDATES}"))
    items = load_items(project.path("data"))
    item_ids = items.get_column("item_id").to_list()
    key_of = {item: i for i, item in enumerate(item_ids)}
    split_df = load_split(project.path("data"), split)
    split_df = split_df.filter(pl.col("user_id").is_in(frame.get_column("user_id").unique().to_list()))
    users = split_df.get_column("user_id").to_list()
    qs = QuerySet(stage, users, split_df.get_column("target").to_list(), split_df.get_column("history").to_list(), [])
    name = name or f"rerank-{how}-{'transitions+' if transitions else ''}{pool['retriever']}-{split}"
    params = {
        "split": split,
        "retriever": pool["retriever"],
        "protocol": f"rerank-{how}",
        "ks": ks,
        "exclude_seen": True,
        "queries": stage,
        "queries_per_user": pool["num_queries"],
        "candidates": pool["candidates"],
        "rrf_k": RRF_K if how == "fused" else None,
        "with_lis": True,
        "transitions": pool.get("transitions"),
    }
    with project.run_stage(
        f"eval/{name}", params, command=command, upstream=("data", stage), libraries=("numpy",)
    ) as run_:
        ranked = reranked(frame, users, key_of, how=how, k=max(ks))
        result = _record(
            run_,
            name,
            qs,
            ranked,
            item_ids,
            params,
            lambda metrics, ci: EvalResult(
                name,
                f"rerank-{how}",
                split,
                pool["retriever"],
                "rerank",
                ks,
                len(users),
                True,
                metrics,
                ci,
                run_.dir,
                rerank={
                    "how": how,
                    "candidates": pool["candidates"],
                    "num_queries": pool["num_queries"],
                    "transitions": transitions,
                },
                ties=ties,
            ),
        )
    result.folder = project.path(f"eval/{name}")
    return result
