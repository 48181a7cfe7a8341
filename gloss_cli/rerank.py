"""`gloss rerank`: the fine-tuned model scores a pool of retrieved candidates for each user.

The pool is the list ``gloss eval --with-lis --protocol fused --exclude-seen -k C`` ranks (C = ``candidates``): the
last item's title, then the first ``num_queries`` generated titles (0: the last item's title alone, no generation
needed), each retrieving its top C, history items excluded, fused by beam-weighted reciprocal rank; its top C.
With ``with_transitions`` (``--with-transitions``) the transitions list's top C leads that fusion.
The model then gives each candidate ``log p("Title: <title>" EOS | prompt)``, the prompt as generation builds it
(``gloss_cli.backends.scoring``: each prompt computed once for its whole pool). ``gloss eval --rerank`` orders each
pool by that score (``lm``: per token, as beam scores are) or fuses it with the pool's order (``fused``).

Output ``rerank/<split>/candidates.parquet`` (BM25's pool; another retriever's in ``rerank/<split>-<retriever>``,
those the transitions list led in ``rerank/<split>-transitions[-<retriever>]``, so that pools can be compared on
validation): user_id, item_id, pool_rank (1 = the fused list's first), logprob (summed over the title's tokens and
EOS), tokens.
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
from gloss_cli.evaluate import TRANSITIONS_PARAMS, generated_users, retrieve, transitions_lists, with_lis_query
from gloss_cli.examples import target_ids
from gloss_cli.generate import fit_prompts, gpu_peak_mib
from gloss_cli.index import open_index
from gloss_cli.models import load_trained, pick_device, read_meta
from gloss_cli.project import Project, StageRun
from gloss_cli.prompt import item_text
from gloss_cli.queries import lis_queries, load_generated
from gloss_cli.retrieval import hybrid_parts, index_key

CANDIDATES = "candidates.parquet"
MAX_NEW_TOKENS = 50  # prompts are cut as generation cuts them: room for a 50-token answer


def stage_name(split: str, retriever: str, *, transitions: bool = False) -> str:
    """The stage holding the pools of ``split`` that ``retriever`` retrieved: BM25's keep the plain name, another
    retriever's carry its index key (path-safe: ``org/model`` -> ``org_model``; ``dense`` -> its default encoder);
    pools that the transitions list led carry ``-transitions``."""
    key = index_key(retriever)
    return f"rerank/{split}" + ("-transitions" if transitions else "") + ("" if key == "bm25" else f"-{key}")


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
    split: str = "validation",
    *,
    retriever: str = "bm25",
    num_queries: int = 2,
    candidates: int = 20,
    with_transitions: bool = False,
    batch_size: int = 0,
    dtype: str = "auto",
    command: str = "gloss rerank",
    reporter: Reporter | None = None,
) -> RerankResult:
    """The ``rerank/<split>`` stage, or ``rerank/<split>-<retriever>`` (the caller holds the project lock)."""
    from gloss_cli.backends.scoring import score_continuations

    reporter = reporter or Reporter()
    if split not in ("validation", "test"):
        raise GlossError(f"Cannot rerank split '{split}'.", "Use --split validation or --split test.")
    if candidates < 1 or num_queries < 0:
        raise GlossError(
            f"--candidates must be >= 1 and --num-queries >= 0 (got {candidates}, {num_queries}).",
            "Try --candidates 20 --num-queries 2.",
        )
    if batch_size < 0:
        raise GlossError(f"--batch-size must be >= 0 (got {batch_size}).", "Pass 0 for the default.")
    hybrid_parts(retriever)  # a malformed hybrid name fails before any work
    here = world()
    if here.several:
        distributed.init_process_group(pick_device())
    project.require("data")
    train_record = project.require("train")
    items = load_items(project.path("data"))
    item_ids = items.get_column("item_id").to_list()
    titles = dict(zip(item_ids, items.get_column("title").to_list(), strict=True))
    split_df = load_split(project.path("data"), split)
    stages: tuple[str, ...] = ()
    if num_queries:
        stage = f"generate/{split}"
        split_df = split_df.filter(pl.col("user_id").is_in(generated_users(project, split)))
        qs = with_lis_query(
            load_generated(project.path(f"{stage}/queries.jsonl"), split_df, titles, stage, num_queries), titles
        )
        stages = (stage,)
    else:
        qs = lis_queries(split_df, titles)
    if here.main:
        index, meta = open_index(project, retriever, query_cache=True, reporter=reporter)
    distributed.wait_all()  # a missing index is a stage: rank 0 builds it, under its lock, before the others read it
    if not here.main:
        index, meta = open_index(project, retriever, build_missing=False, reporter=reporter)
    params = {
        "split": split,
        "retriever": meta["key"],
        "num_queries": num_queries,
        "candidates": candidates,
        "pool": ("the transitions list, then " if with_transitions else "")
        + "the last item's title, then the generated queries; top-K each, fused, history items excluded",
        "transitions": TRANSITIONS_PARAMS if with_transitions else None,
        "score": "log p(Title: <title> EOS | prompt), summed",
        "train": train_record["fingerprint"],
    }
    upstream = ("data", "train", *meta["stages"], *stages)
    libraries = ("torch", "transformers", "peft", "bm25s")
    stage_dir = stage_name(split, retriever, transitions=with_transitions)
    # ranks > 0 never take the lock nor write the stage: they score their share of the users for rank 0
    writing = project.run_stage(stage_dir, params, command=command, libraries=libraries, upstream=upstream)
    with writing if here.main else contextlib.nullcontext(StageRun(stage_dir, project.path(stage_dir), params)) as st:
        key_of = {item: i for i, item in enumerate(item_ids)}
        lead = transitions_lists(project, qs, key_of, depth=candidates, exclude_seen=True) if with_transitions else None
        pools = retrieve(
            index, qs, key_of, protocol="fused", exclude_seen=True, k=candidates, reporter=reporter, lead=lead
        )  # (users, candidates), -1 padded
        targets = np.array([key_of[t] for t in qs.targets])
        pool_recall = float((pools == targets[:, None]).any(axis=1).mean()) if len(targets) else 0.0
        meta_train = read_meta(project.path("train"))
        device = pick_device()
        trained = load_trained(project.path("train"), device=device, dtype=dtype, reporter=reporter)
        model, tokenizer = trained.model.eval(), trained.tokenizer
        tokenizer.padding_side = "left"
        budget = int(meta_train["max_seq_len"]) - MAX_NEW_TOKENS
        prompts = fit_prompts(
            lambda texts: [len(ids) for ids in tokenizer(list(texts))["input_ids"]],
            [[titles[i] for i in h] for h in qs.histories],
            budget,
        )
        pool_lists = [[int(k) for k in row if k >= 0] for row in pools.tolist()]
        needed = sorted({k for row in pool_lists for k in row})
        ids_of = dict(zip(needed, target_ids(tokenizer, [item_text(titles[item_ids[k]]) for k in needed]), strict=True))
        size = batch_size or (64 if device == "cuda" else 4)
        # longest first (fail fast on memory); under torchrun this process's share of one process's batches
        batches = shards.share(shards.length_batches(prompts, size), here)
        logprob: list[list[float]] = [[] for _ in prompts]
        t0 = time.perf_counter()
        with reporter.progress("scoring candidates", sum(len(b) for b in batches)) as tick:
            for batch in batches:
                enc = tokenizer([prompts[i] for i in batch], return_tensors="pt", padding=True).to(device)
                scores = score_continuations(
                    model,
                    enc["input_ids"],
                    enc["attention_mask"],
                    [[ids_of[k] for k in pool_lists[i]] for i in batch],
                    pad_token_id=tokenizer.pad_token_id,
                    max_logits=2**29 if device == "cuda" else 2**25,  # one chunk's logits: 2 GiB / 128 MiB of floats
                )
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
                "tokens": [len(ids_of[i]) for _, i, _ in rows],
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
