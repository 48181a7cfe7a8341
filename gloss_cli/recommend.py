"""`gloss recommend`: next-item recommendations for known users or for a typed-in history, ranked by a recipe
(``gloss_cli.recipe``; default: the pick docs/RESULTS.md reports) through ``gloss_cli.ranking``, as ``gloss eval``
ranks them.

The model and the index load once per :class:`Recommender` (the model only when the recipe has its queries, the
index only when a list retrieves); each call builds the prompts, generates the queries (beam search), retrieves every
query's top items and merges them. The transitions list is counted from all of the project's interactions: a deployed
recommender knows them all; each call counts only the sequences that hold one of its users' recent items (the only
pairs their lists read: the same weights as counting every sequence, in a fraction of the time). The sasrec list
comes from the model ``gloss sasrec`` trained on the train split, the one ``gloss eval`` scores, run on the CPU
(torch is imported for it alone): it reads the user's whole history (every catalog item has an embedding) and is not
retrained on the held-out items, so a history gets the sasrec list that ``gloss eval`` gives that history.

The beam search is the evaluated one: the backend, beam count and dtype of the project's ``gloss generate`` stage
(test, else validation) when it generated at least the recipe's queries, else the recipe's query count as beams
(``gloss run``'s CPU default generates 2 for the 2 queries of recipe gloss; 5 for the paper's recipes). A beam ends
at the end of its title line as well as at EOS where the stage's beams did, or where there is no stage: a query is
that line (``clean_query``), and a weakly trained model that has not learnt EOS would otherwise write further lines
up to ``max_new_tokens``; where the stage's beams ran on, so do the served ones, which then equal the evaluated.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import polars as pl

from gloss_cli.console import Reporter
from gloss_cli.errors import GlossError
from gloss_cli.generate import GenerateOptions, clean_query, default_backend, fit_prompts, open_generator
from gloss_cli.index import open_index
from gloss_cli.models import read_meta
from gloss_cli.project import Project
from gloss_cli.queries import query_text
from gloss_cli.ranking import rank_users, transitions_lists
from gloss_cli.recipe import DEFAULT, PRESETS, Recipe
from gloss_cli.retrieval import hybrid_parts, index_key
from gloss_cli.transitions import RECENT

TRANSITIONS_QUERY = "(transitions: what followed the latest items in other histories)"
SASREC_QUERY = "(sasrec: the item-ID model's next items)"


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
        recipe: Recipe | None = None,
        retriever: str = "bm25",
        encoder: str | None = None,
        backend: str | None = None,
        k: int = 10,
        beams: int | None = None,
        stop_at_newline: bool | None = None,
        reporter: Reporter | None = None,
    ) -> None:
        """``beams``, ``stop_at_newline``: None follows the project's generate stage (see the module's docstring)."""
        recipe = recipe or PRESETS[DEFAULT]
        if recipe.reranked:
            raise GlossError(
                f"gloss recommend ranks in retrieval order; recipe {recipe.name()} reorders scored pools.",
                "Use a recipe with order=retrieval (e.g. gloss), or 'gloss rerank' + 'gloss eval' for this one.",
            )
        if k < 1:
            raise GlossError(f"-k must be at least 1, got {k}.", "Pass e.g. -k 10.")
        if beams is not None and beams < recipe.queries:
            raise GlossError(
                f"{beams} beams cannot return recipe {recipe.name()}'s {recipe.queries} queries.",
                f"Use at least {recipe.queries} beams.",
            )
        if backend is not None and not recipe.uses_model:
            raise GlossError(
                f"--backend does not apply to recipe {recipe.name()}: it generates nothing.", "Drop --backend."
            )
        if recipe.uses_model or "sasrec" in recipe.lists:
            # OpenMP threads (torch's, llama.cpp's, CTranslate2's) that spin at their barriers wait for peers that a
            # busy machine does not run: on 2 cores shared with one other job, one call took 75 s instead of 3.5 s
            # (benchmarks/README.md). Read when the runtime loads, so set before any of them is imported.
            os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        self.reporter = reporter or Reporter()
        self.recipe, self.k = recipe, k
        self.load_timings: dict[str, float] = {}  # seconds per part of loading, for --profile and the benchmark
        t0 = time.perf_counter()
        project.require("data")
        items = pl.read_parquet(project.path("data/items.parquet"))
        self.item_ids: list[str] = items.get_column("item_id").to_list()
        self.titles: list[str] = items.get_column("title").to_list()
        self.key_of = {item: i for i, item in enumerate(self.item_ids)}
        self.key_of_title = {title: i for i, title in enumerate(self.titles)}
        self.sequences = pl.read_parquet(project.path("data/sequences.parquet"), columns=["user_id", "item_ids"])
        self.histories: dict[str, list[str]] = dict(self.sequences.iter_rows())
        self.load_timings["data"] = time.perf_counter() - t0
        self.sasrec: Any = None  # the trained SASRec (gloss_cli.sasrec.SASRec) when the recipe has its list
        if "sasrec" in recipe.lists:  # before the language model: a missing or stale stage is one line, at once
            t0 = time.perf_counter()
            from gloss_cli import sasrec

            # The CPU even beside a GPU: one user's history takes about a millisecond, less than a CUDA context
            # takes to start.
            self.sasrec, _, _ = sasrec.load(project, device="cpu")
            self.load_timings["sasrec"] = time.perf_counter() - t0
        self.generator = None
        self.budget = 0
        self.options: GenerateOptions | None = None  # the beam search served with (None: the recipe has no model)
        if recipe.uses_model:
            t0 = time.perf_counter()
            project.require("train", "gloss train --dataset beauty")
            meta = read_meta(project.path("train"))
            self.options = generate_options(project, recipe, backend, beams, stop_at_newline)
            self.budget = int(meta["max_seq_len"]) - self.options.max_new_tokens
            self.generator = open_generator(project.path("train"), meta, self.options, self.reporter)
            self.load_timings["model"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        self.index = None
        if recipe.retrieves:
            missing = [p for p in hybrid_parts(retriever) if project.stage(f"index/{index_key(p, encoder)}") is None]
            # Building a missing index writes a stage: as any writer, under the project lock (a writer starting
            # meanwhile would otherwise remove its temporary folder as debris).
            building = project.lock(f"gloss index --retriever {retriever}", self.reporter) if missing else nullcontext()
            with building:
                self.index, self.index_meta = open_index(project, retriever, encoder=encoder, reporter=self.reporter)
        self.load_timings["index"] = time.perf_counter() - t0

    def transition_counts(self, histories: Sequence[Sequence[str]]) -> pl.DataFrame:
        """The transition weights of every known sequence for the pairs that start at one of these histories'
        ``RECENT`` latest items (the only pairs their lists read): counted from the sequences holding such an
        item, each sequence as the train split holds it (history, then target)."""
        from gloss_cli.transitions import transition_counts

        recent = sorted({item for history in histories for item in history[-RECENT:]})
        holding = self.sequences.filter(pl.col("item_ids").list.eval(pl.element().is_in(recent)).list.any())
        n = pl.col("item_ids").list.len()
        return transition_counts(
            holding.select(
                "user_id", history=pl.col("item_ids").list.slice(0, n - 1), target=pl.col("item_ids").list.last()
            )
        )

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

    def _lead_lists(self, histories: list[list[str]]) -> tuple[list[npt.NDArray[np.int64]], list[str]]:
        """The recipe's lists ranked without retrieval, in its order (as ``evaluate.lead_list`` ranks them), each
        (users, k) and -1 padded, and their names as the queries show them."""
        leads, named = [], []
        exclude = self.recipe.exclude_seen
        if self.sasrec is not None:
            from gloss_cli.sasrec import rank

            leads.append(rank(self.sasrec, histories, self.key_of, depth=self.k, exclude_seen=exclude, device="cpu"))
            named.append(SASREC_QUERY)
        if "transitions" in self.recipe.lists:  # counted from every known sequence
            counts = self.transition_counts(histories)
            leads.append(transitions_lists(counts, histories, self.key_of, depth=self.k, exclude_seen=exclude))
            named.append(TRANSITIONS_QUERY)
        return leads, named

    def _recommend(
        self, users: list[str | None], histories: list[list[str]], seen: list[set[int]], item_ids: list[list[str]]
    ) -> list[UserRecommendations]:
        t0 = t1 = time.perf_counter()
        queries: list[list[tuple[str, float]]] = [[] for _ in users]
        if self.generator is not None and self.options is not None:
            prompts = fit_prompts(self.generator.count_tokens, histories, self.budget)
            t1 = time.perf_counter()
            o = self.options
            beams = self.generator.generate(
                prompts, beams=o.beams, num_return=o.num_return, max_new_tokens=o.max_new_tokens
            )
            queries = [[(clean_query(text), float(score)) for text, score in user] for user in beams]
        t2 = time.perf_counter()
        if "lis" in self.recipe.lists:  # the last item's title first; 0.0: it is no beam of the model
            queries = [[(history[-1], 0.0), *user] for history, user in zip(histories, queries, strict=True)]
        leads, named = self._lead_lists(item_ids)  # the lists ranked without retrieval, first
        texts = [[query_text(text) for text, _ in user] for user in queries]
        lead = np.stack(leads, axis=1) if leads else None
        merged = rank_users(self.recipe, texts, seen, k=self.k, retriever=self.index, lead=lead)
        queries = [[*((name, 0.0) for name in named), *user] for user in queries]
        t3 = time.perf_counter()
        results = []
        for u, user in enumerate(users):
            items = [
                Item(rank + 1, self.item_ids[key], self.titles[key], round(float(value), 6), q)
                for rank, (key, value, q) in enumerate(merged[u])
            ]
            results.append(UserRecommendations(user, histories[u], queries[u], items))
        n = len(users)
        timings = {"prompt": (t1 - t0) / n, "generation": (t2 - t1) / n, "retrieval": (t3 - t2) / n}
        for r in results:
            r.timings = {key: round(v, 4) for key, v in timings.items()}
        return results


def generate_options(
    project: Project, recipe: Recipe, backend: str | None, beams: int | None, stop_at_newline: bool | None
) -> GenerateOptions:
    """The beam search to serve with: the one eval measured, i.e. the project's generate stage's (test, else
    validation) beams, max_new_tokens and, on its backend, dtype, when it returned at least the recipe's queries;
    else ``beams`` or the recipe's query count as beams. A beam ends at the end of its title line only where the
    stage's did (no stage: it does), so that the queries served are the ones evaluated. The backend: ``backend``,
    else this machine's default (on a CPU llama.cpp, else ct2, where installed: llama.cpp returns transformers'
    beams up to float noise; ct2's search stops once ``beams`` hypotheses have finished, so its lower beams can
    differ, gloss_cli.backends.ct2)."""
    params: dict[str, Any] = {}
    for split in ("test", "validation"):
        found = (project.stage(f"generate/{split}") or {}).get("params", {})
        if found.get("num_return", 0) >= recipe.queries:
            params = found
            break
    chosen = backend or default_backend()  # the fastest here (llama.cpp or ct2 on a CPU), whatever the stage ran on
    return GenerateOptions(
        backend=chosen,
        beams=beams or int(params.get("beams", recipe.queries)),
        num_return=recipe.queries,
        max_new_tokens=int(params.get("max_new_tokens", GenerateOptions.max_new_tokens)),
        dtype=str(params.get("dtype", "auto")) if params.get("backend") == chosen else "auto",
        stop_at_newline=bool(params.get("stop_at_newline", not params)) if stop_at_newline is None else stop_at_newline,
    )
