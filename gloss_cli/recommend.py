"""`gloss recommend`: next-item recommendations for known users or for a typed-in history.

The model and the index load once per :class:`Recommender`; each call builds the prompts, generates the queries
(beam search), retrieves every query's top items and merges them with the ``fused`` protocol of ``gloss eval``
(history items excluded by default) or the ``paper`` one. ``with_transitions`` fuses first what followed the
user's latest items in every known sequence (``gloss_cli.transitions``, counted from all of the project's
interactions: a deployed recommender knows them all).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import polars as pl

from gloss_cli.console import Reporter
from gloss_cli.errors import GlossError
from gloss_cli.evaluate import PROTOCOLS, merge_user, padded_keys, with_lead_list
from gloss_cli.generate import GenerateOptions, clean_query, default_backend, fit_prompts, open_generator
from gloss_cli.index import open_index
from gloss_cli.models import read_meta
from gloss_cli.project import Project
from gloss_cli.queries import query_text
from gloss_cli.retrieval import hybrid_parts, index_key

TRANSITIONS_QUERY = "(transitions: what followed the latest items in other histories)"


@dataclass
class Item:
    rank: int
    item_id: str
    title: str
    score: float
    query: int  # index of the generated query that found it first (0 = best beam)


@dataclass
class UserRecommendations:
    user_id: str | None
    history: list[str]  # titles, oldest first
    queries: list[tuple[str, float]]  # (generated title, beam score), best first
    items: list[Item]
    timings: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "user_id": self.user_id,
            "history": self.history,
            "queries": [{"text": t, "score": s} for t, s in self.queries],
            "items": [item.__dict__ for item in self.items],
            "timings_s": self.timings,
        }


class Recommender:
    def __init__(
        self,
        project: Project,
        *,
        retriever: str = "bm25",
        encoder: str | None = None,
        backend: str | None = None,
        protocol: str = "fused",
        exclude_seen: bool = True,
        k: int = 10,
        with_lis: bool = False,
        with_transitions: bool = False,
        reporter: Reporter | None = None,
    ) -> None:
        if protocol not in PROTOCOLS:
            raise GlossError(f"Unknown protocol '{protocol}'.", f"Use one of: {', '.join(PROTOCOLS)}.")
        if with_transitions and protocol != "fused":
            raise GlossError("--with-transitions fuses ranked lists.", "Drop --protocol paper.")
        if k < 1:
            raise GlossError(f"-k must be at least 1, got {k}.", "Pass e.g. -k 10.")
        self.reporter = reporter or Reporter()
        self.protocol, self.exclude_seen, self.k, self.with_lis = protocol, exclude_seen, k, with_lis
        project.require("data")
        project.require("train", "gloss train --dataset beauty")
        items = pl.read_parquet(project.path("data/items.parquet"))
        self.item_ids: list[str] = items.get_column("item_id").to_list()
        self.titles: list[str] = items.get_column("title").to_list()
        self.key_of = {item: i for i, item in enumerate(self.item_ids)}
        self.key_of_title = {title: i for i, title in enumerate(self.titles)}
        sequences = pl.read_parquet(project.path("data/sequences.parquet"), columns=["user_id", "item_ids"])
        self.histories: dict[str, list[str]] = dict(sequences.iter_rows())
        self.transitions = None
        if with_transitions:
            from gloss_cli.transitions import transition_counts

            n = pl.col("item_ids").list.len()
            self.transitions = transition_counts(
                sequences.select(
                    "user_id", history=pl.col("item_ids").list.slice(0, n - 1), target=pl.col("item_ids").list.last()
                )
            )
        meta = read_meta(project.path("train"))
        self.options = GenerateOptions(backend=backend or default_backend())
        self.budget = int(meta["max_seq_len"]) - self.options.max_new_tokens
        self.generator = open_generator(project.path("train"), meta, self.options, self.reporter)
        missing = [p for p in hybrid_parts(retriever) if project.stage(f"index/{index_key(p, encoder)}") is None]
        # Building a missing index writes a stage: as any writer, under the project lock (a writer starting meanwhile
        # would otherwise remove its temporary folder as debris).
        building = project.lock(f"gloss index --retriever {retriever}", self.reporter) if missing else nullcontext()
        with building:
            self.index, self.index_meta = open_index(project, retriever, encoder=encoder, reporter=self.reporter)

    def history_of(self, user_id: str) -> list[str]:
        history = self.histories.get(user_id)
        if history is None:
            raise GlossError(
                f"Unknown user '{user_id}'.",
                'Recommend for a history instead: gloss recommend --history "title 1" --history "title 2"',
            )
        return history

    def for_users(self, user_ids: Sequence[str]) -> list[UserRecommendations]:
        histories = [self.history_of(u) for u in user_ids]
        titled = [[self.titles[self.key_of[i]] for i in h] for h in histories]
        seen = [{self.key_of[i] for i in h} for h in histories]
        return self._recommend(list(user_ids), titled, seen, histories)

    def for_history(self, titles: Sequence[str]) -> UserRecommendations:
        cleaned = [" ".join(t.split()) for t in titles if t.strip()]
        if not cleaned:
            raise GlossError("The history is empty.", 'Pass at least one --history "item title".')
        known = [self.key_of_title[t] for t in cleaned if t in self.key_of_title]  # only catalog titles vote
        return self._recommend([None], [cleaned], [set(known)], [[self.item_ids[k] for k in known]])[0]

    def _recommend(
        self, users: list[str | None], histories: list[list[str]], seen: list[set[int]], item_ids: list[list[str]]
    ) -> list[UserRecommendations]:
        t0 = time.perf_counter()
        prompts = fit_prompts(self.generator.count_tokens, histories, self.budget)
        t1 = time.perf_counter()
        o = self.options
        beams = self.generator.generate(
            prompts, beams=o.beams, num_return=o.num_return, max_new_tokens=o.max_new_tokens
        )
        t2 = time.perf_counter()
        queries = [[(clean_query(text), float(score)) for text, score in user] for user in beams]
        if self.with_lis:  # the last item's title first (gloss eval --with-lis); 0.0: it is no beam of the model
            queries = [[(history[-1], 0.0), *user] for history, user in zip(histories, queries, strict=True)]
        per_user = len(queries[0])
        flat = [query_text(text) for user in queries for text, _ in user]
        extra = max(len(s) for s in seen) if self.exclude_seen else 0
        depth = self.k if self.protocol == "fused" else 1
        keys, scores = self.index.search(flat, min(depth + extra, len(self.item_ids)))
        keys = keys.reshape(len(users), per_user, -1)
        scores = scores.reshape(len(users), per_user, -1)
        if self.transitions is not None:  # its list first, as gloss eval --with-transitions fuses it
            from gloss_cli.transitions import recommend

            width = keys.shape[2]
            lists = recommend(self.transitions, item_ids, depth=width, exclude_seen=self.exclude_seen)
            keys, scores = with_lead_list(keys, scores, padded_keys(lists, self.key_of, width))
            queries = [[(TRANSITIONS_QUERY, 0.0), *user] for user in queries]
        t3 = time.perf_counter()
        results = []
        for u, user in enumerate(users):
            excluded = seen[u] if self.exclude_seen else set()
            merged = merge_user(keys[u], scores[u], excluded, protocol=self.protocol, depth=depth)[: self.k]
            items = [
                Item(rank + 1, self.item_ids[key], self.titles[key], round(float(value), 6), q)
                for rank, (key, value, q) in enumerate(merged)
            ]
            results.append(UserRecommendations(user, histories[u], queries[u], items))
        n = len(users)
        timings = {"prompt": (t1 - t0) / n, "generation": (t2 - t1) / n, "retrieval": (t3 - t2) / n}
        for r in results:
            r.timings = {key: round(v, 4) for key, v in timings.items()}
        return results
