"""`gloss rerank`: the fine-tuned model scores each user's pool of candidates, for a recipe whose ``order`` is lm or
fused (``gloss_cli.recipe``).

The pool is the recipe's own list in retrieval order (``gloss_cli.ranking``: its lists, merge and seen items), cut
to its top ``candidates``; its lists may be any, ``sasrec`` among them (the model ``gloss sasrec`` trained on the
train split: it never saw a validation or test target, though its settings were chosen on validation). The model
then gives each candidate ``log p("Title: <title>" EOS | prompt)``, the prompt as generation builds it
(``gloss_cli.backends.scoring``: each prompt computed once for its whole pool). ``gloss eval --recipe`` orders each
pool by that score (``lm``: per token, as beam scores are) or fuses it with the pool's order (``fused``).

A model trained with ``gloss train --task pick`` (``gloss_cli.pick``) scores a pool instead with one forward pass:
the prompt shows the lettered pool, and each candidate's score is the log-softmax over the pool's letters at the
answer (tokens = 1). It scores only pools like the ones it was trained on (lists, merge, seen, candidates).

Output ``rerank/<split>-<pool recipe>-<candidates>-<retriever>/candidates.parquet`` (``ranking.rerank_stage``):
user_id, item_id, pool_rank (1 = the list's first), logprob (summed over the title's tokens and EOS), tokens.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from gloss_cli import distributed, shards
from gloss_cli.console import Reporter
from gloss_cli.data import load_items, load_split
from gloss_cli.distributed import world
from gloss_cli.errors import GlossError
from gloss_cli.evaluate import TRAIN_TRANSITIONS, lead_list, recipe_queries
from gloss_cli.examples import target_ids
from gloss_cli.generate import fit_prompts, gpu_peak_mib
from gloss_cli.index import open_index
from gloss_cli.models import load_trained, pick_device, read_meta
from gloss_cli.project import Project, StageRun
from gloss_cli.prompt import item_text
from gloss_cli.ranking import CANDIDATES, as_array, rank_users, rerank_stage
from gloss_cli.recipe import DEFAULT_RERANK, PRESETS, Recipe
from gloss_cli.retrieval import hybrid_parts

MAX_NEW_TOKENS = 50  # prompts are cut as generation cuts them: room for a 50-token answer
PICK_SCORE = "log-softmax over the pool's letters at the answer (a gloss train --task pick model), one forward pass"


def _check_pick_pool(meta_train: dict[str, Any], recipe: Recipe, retriever: str) -> None:
    """A pick model scores the pools it was trained on: the same lists, merge, seen items and candidates, and for
    LIS the same retriever (checked before any index is built)."""
    from gloss_cli.pick import same_pool
    from gloss_cli.recipe import from_dict
    from gloss_cli.retrieval import index_key

    trained = from_dict(meta_train["pick"]["pool"])
    if not same_pool(trained, recipe):
        raise GlossError(
            f"The pick model was trained on the pools of recipe {trained.name()} (candidates={trained.candidates}),"
            f" not {recipe.name()} (candidates={recipe.candidates}).",
            f"Use --recipe '{trained.explicit()}', or train again with --pool.",
        )
    was = meta_train["pick"]["retriever"]
    if recipe.retrieves and index_key(retriever) != was:
        raise GlossError(
            f"The pick model was trained on pools that {was} retrieved, not {index_key(retriever)}.",
            f"Use --retriever {was}, or train again.",
        )


@dataclass
class RerankResult:
    split: str
    path: Path
    users: int
    candidates: int
    seconds: float
    pool_recall: float  # share of users whose held-out item is in the pool: the most a reordering can reach
    gpu_peak_mib: float | None

    def metrics(self) -> dict[str, Any]:
        rate = self.users / self.seconds if self.seconds else None
        return {
            "users": self.users,
            "candidates": self.candidates,
            "pool_recall": round(self.pool_recall, 6),
            "seconds": round(self.seconds, 3),
            "users_per_s": round(rate, 3) if rate else None,
        } | ({"gpu_peak_mib": self.gpu_peak_mib} if self.gpu_peak_mib is not None else {})


def run(
    project: Project,
    split: str = "test",
    *,
    recipe: Recipe | None = None,
    retriever: str = "bm25",
    batch_size: int = 0,
    dtype: str = "auto",
    command: str = "gloss rerank",
    reporter: Reporter | None = None,
) -> RerankResult:
    """The ``rerank/...`` stage of ``recipe``'s pools (the caller holds the project lock)."""
    from gloss_cli.backends.scoring import score_continuations

    reporter = reporter or Reporter()
    recipe = recipe or PRESETS[DEFAULT_RERANK]
    if split not in ("validation", "test"):
        raise GlossError(f"Cannot rerank split '{split}'.", "Use --split validation or --split test.")
    if not recipe.reranked:
        raise GlossError(
            f"Recipe {recipe.name()} keeps the retrieval order: there is nothing for the model to score.",
            "Use a recipe with order=lm or order=fused (the presets rerank, rerank-lm).",
        )
    if batch_size < 0:
        raise GlossError(f"--batch-size must be >= 0 (got {batch_size}).", "Pass 0 for the default.")
    candidates = recipe.candidates
    if recipe.retrieves:
        hybrid_parts(retriever)  # a malformed hybrid name fails before any work
    here = world()
    if here.several:
        distributed.init_process_group(pick_device())
    project.require("data")
    train_record = project.require("train")
    meta_train = read_meta(project.path("train"))
    pick_task = meta_train.get("task") == "pick"
    if pick_task:
        # A sasrec pool would be no leak here (SASRec never learnt these targets), but no pick model learnt one
        # (pick.pool_recipe refuses it for training, where the targets are the answers): the same-pool rule refuses it.
        _check_pick_pool(meta_train, recipe, retriever)
    sasrec_record = None
    if "sasrec" in recipe.lists:  # no model, or one trained on other data: one line before any work
        from gloss_cli.sasrec import require

        sasrec_record = require(project)
    items = load_items(project.path("data"))
    item_ids = items.get_column("item_id").to_list()
    titles = dict(zip(item_ids, items.get_column("title").to_list(), strict=True))
    split_df = load_split(project.path("data"), split)
    qs, _, stages = recipe_queries(project, recipe, split, split_df, titles)
    index = None
    meta: dict[str, Any] = {"key": "none", "stages": ()}
    if qs.per_user:
        if here.main:
            index, meta = open_index(project, retriever, query_cache=True, reporter=reporter)
        # a missing index is a stage: rank 0 builds it, under its lock, before the others read it
        distributed.wait_all()
        if not here.main:
            index, meta = open_index(project, retriever, build_missing=False, reporter=reporter)
    params = {
        "split": split,
        "recipe": recipe.pool().as_dict(),
        "retriever": meta["key"],
        "num_queries": recipe.queries,
        "candidates": candidates,
        "transitions": TRAIN_TRANSITIONS if "transitions" in recipe.lists else None,
        "sasrec": sasrec_record["params"] | {"metrics": sasrec_record["metrics"]} if sasrec_record else None,
        "score": PICK_SCORE if pick_task else "log p(Title: <title> EOS | prompt), summed",
        "train": train_record["fingerprint"],
    }
    upstream = ("data", "train", *meta["stages"], *stages, *(("sasrec",) if sasrec_record else ()))
    libraries = ("torch", "transformers", "peft", "bm25s")
    stage_dir = rerank_stage(split, recipe, retriever)
    # ranks > 0 never take the lock nor write the stage: they score their share of the users for rank 0
    writing = project.run_stage(stage_dir, params, command=command, libraries=libraries, upstream=upstream)
    with writing if here.main else contextlib.nullcontext(StageRun(stage_dir, project.path(stage_dir), params)) as st:
        key_of = {item: i for i, item in enumerate(item_ids)}
        lead = lead_list(project, recipe, qs, key_of, depth=candidates)
        seen = [{key_of[i] for i in h} for h in qs.histories]
        merged = rank_users(
            recipe.pool(), qs.queries, seen, k=candidates, retriever=index, lead=lead, reporter=reporter
        )
        pools = as_array(merged, candidates)  # (users, candidates), -1 padded
        targets = np.array([key_of[t] for t in qs.targets])
        pool_recall = float((pools == targets[:, None]).any(axis=1).mean()) if len(targets) else 0.0
        device = pick_device()
        trained = load_trained(project.path("train"), device=device, dtype=dtype, reporter=reporter)
        model, tokenizer = trained.model.eval(), trained.tokenizer
        tokenizer.padding_side = "left"
        histories = [[titles[i] for i in h] for h in qs.histories]
        pool_lists = [[int(k) for k in row if k >= 0] for row in pools.tolist()]
        size = batch_size or (64 if device == "cuda" else 4)
        if pick_task:
            from gloss_cli import pick

            letters = pick.letter_ids(tokenizer, candidates)
            pick_prompts, _ = pick.fit_prompts(
                tokenizer,
                histories,
                [[titles[item_ids[k]] for k in row] for row in pool_lists],
                int(meta_train["max_seq_len"]) - 2,  # the letter and EOS, as in training
            )
            prompts = [" " * len(ids) for ids in pick_prompts]  # their lengths order the batches

            def score(batch: list[int]) -> list[list[float]]:
                return pick.score_letters(
                    model,
                    [pick_prompts[i] for i in batch],
                    [len(pool_lists[i]) for i in batch],
                    letters,
                    pad_token_id=tokenizer.pad_token_id,
                )

            def tokens_of(key: int) -> int:
                return 1
        else:
            budget = int(meta_train["max_seq_len"]) - MAX_NEW_TOKENS
            prompts = fit_prompts(
                lambda texts: [len(ids) for ids in tokenizer(list(texts))["input_ids"]], histories, budget
            )
            needed = sorted({k for row in pool_lists for k in row})
            ids_of = dict(
                zip(needed, target_ids(tokenizer, [item_text(titles[item_ids[k]]) for k in needed]), strict=True)
            )

            def score(batch: list[int]) -> list[list[float]]:
                enc = tokenizer([prompts[i] for i in batch], return_tensors="pt", padding=True).to(device)
                return score_continuations(
                    model,
                    enc["input_ids"],
                    enc["attention_mask"],
                    [[ids_of[k] for k in pool_lists[i]] for i in batch],
                    pad_token_id=tokenizer.pad_token_id,
                    max_logits=2**29 if device == "cuda" else 2**25,  # one chunk's logits: 2 GiB / 128 MiB of floats
                )

            def tokens_of(key: int) -> int:
                return len(ids_of[key])

        # longest first (fail fast on memory); under torchrun this process's share of one process's batches
        batches = shards.share(shards.length_batches(prompts, size), here)
        logprob: list[list[float]] = [[] for _ in prompts]
        t0 = time.perf_counter()
        with reporter.progress("scoring candidates", sum(len(b) for b in batches)) as tick:
            for batch in batches:
                scores = score(batch)
                for i, values in zip(batch, scores, strict=True):
                    logprob[i] = values
                tick.advance(len(batch))
        scored = distributed.gather({i: logprob[i] for batch in batches for i in batch})  # on rank 0: all ranks'
        distributed.leave()
        if not here.main:
            return RerankResult(split, st.dir, len(prompts), candidates, time.perf_counter() - t0, pool_recall, None)
        for share in scored:
            for i, values in share.items():
                logprob[i] = values
        seconds = time.perf_counter() - t0
        rows = [(u, i, r) for u, pool in enumerate(pool_lists) for r, i in enumerate(pool)]
        pl.DataFrame(
            {
                "user_id": [qs.users[u] for u, _, _ in rows],
                "item_id": [item_ids[i] for _, i, _ in rows],
                "pool_rank": [r + 1 for _, _, r in rows],
                "logprob": [logprob[u][r] for u, _, r in rows],
                "tokens": [tokens_of(i) for _, i, _ in rows],
            },
            schema={
                "user_id": pl.String,
                "item_id": pl.String,
                "pool_rank": pl.Int32,
                "logprob": pl.Float32,
                "tokens": pl.Int32,
            },
        ).write_parquet(st.dir / CANDIDATES)
        result = RerankResult(
            split,
            project.path(f"{stage_dir}/{CANDIDATES}"),
            len(prompts),
            candidates,
            seconds,
            pool_recall,
            gpu_peak_mib(),
        )
        st.params |= {"device": device, "batch_size": size, "world_size": here.size}
        st.metrics = result.metrics()
    return result
