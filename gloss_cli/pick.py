"""`gloss train --task pick`: the model learns to pick the next item from a pool of candidates (LlamaRec's listwise
ranking with a verbalizer; Yue et al. 2023), and ``gloss rerank`` scores a whole pool with one forward pass.

The pool of a train example is what ``gloss rerank`` would score for it: a model-free recipe's list (transitions,
LIS or both; ``gloss_cli.ranking``), cut to the recipe's ``candidates`` (at most 20, one letter each), kept in the
pool's own order (not shuffled: the model sees the order rerank will show it, and may use it). The target, when the
pool lacks it, takes a seeded random place (LlamaRec does this; without it there is no answer), the pool's last
candidate leaving a full pool; how often that happened is recorded (``target_absent`` in train/meta.json and the
manifest). The prompt (``gloss_cli.prompt.build_pick_prompt``) shows the history titles as generation does, then the
lettered pool; the answer is the target's letter (the vocabulary's bare letter token), then EOS, so the training
loop is the generation task's own (``--loss completion`` by default for this task: the answer alone).

No leak: a history holds only items before its target, and the pool knows no more than an evaluation's pool knows of
a held-out item. LIS reads the catalog's titles only. The transitions list is counted from the train split's
sequences, the train example's own target among them; for each train example the pairs its user's sequence adds at
or after the target (``transitions.own_pairs``) are taken out of the counts for that example, which leaves every
other user's sequence and this user's items before the target, as evaluation leaves every train sequence and the
user's history. (Other users' sequences may end later in time than this target: the leave-one-out protocol ignores
time across users, at evaluation too.) SASRec is refused: it was trained on the train split's targets.

At ``gloss rerank``, the prompt is cut as in training and one forward pass gives the next-token logits at the answer;
a log-softmax over the pool's letters ranks it (candidates.parquet: logprob = the letter's, tokens = 1).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import polars as pl

from gloss_cli.console import Reporter
from gloss_cli.errors import GlossError
from gloss_cli.examples import Encoded, fit_history
from gloss_cli.project import Project
from gloss_cli.prompt import LETTERS, build_pick_prompt
from gloss_cli.recipe import Recipe, parse

MAX_CANDIDATES = len(LETTERS)
POOL_ORDER = (
    "the pool's own order (not shuffled); an absent target takes a seeded random place, the last candidate of a "
    "full pool leaving"
)


def pool_recipe(text: str) -> Recipe:
    """The ``--pool`` recipe of a pick task, checked: model-free, no SASRec, reranked, at most 20 candidates."""
    try:
        recipe = parse(text)
    except GlossError as exc:
        raise GlossError(f"--pool: {exc.message}", exc.hint) from None
    if recipe.uses_model:
        raise GlossError(
            f"--pool {recipe.name()} ranks with the model's generated titles: a pick pool must be model-free.",
            'Use lists of transitions and lis, e.g. --pool "transitions order=lm candidates=20".',
        )
    if "sasrec" in recipe.lists:
        raise GlossError(
            "--pool cannot take the sasrec list: SASRec was trained on the train split's targets, the answers.",
            'Use lists of transitions and lis, e.g. --pool "transitions order=lm candidates=20".',
        )
    if not recipe.reranked:
        raise GlossError(
            f"--pool {recipe.name()} keeps the retrieval order: name the pool gloss rerank will score.",
            'Add order=lm and candidates=N, e.g. --pool "transitions order=lm candidates=20".',
        )
    if recipe.candidates > MAX_CANDIDATES:
        raise GlossError(
            f"--pool candidates={recipe.candidates}: the pick prompt labels at most {MAX_CANDIDATES} candidates.",
            f"Use candidates={MAX_CANDIDATES} or fewer.",
        )
    return recipe


def same_pool(a: Recipe, b: Recipe) -> bool:
    """Whether two recipes give the same pools (the users they score and the order eval applies aside)."""
    return (a.lists, a.merge, a.seen, a.candidates) == (b.lists, b.merge, b.seen, b.candidates)


@dataclass
class PickRows:
    histories: list[list[str]] = field(default_factory=list)  # titles, oldest first
    pools: list[list[str]] = field(default_factory=list)  # titles, in the pool's order (the target among them)
    answers: list[int] = field(default_factory=list)  # the target's place in its pool
    absent: int = 0  # examples whose pool lacked the target (it was put in)


def train_rows(
    project: Project, recipe: Recipe, frames: Sequence[pl.DataFrame], *, seed: int, reporter: Reporter
) -> tuple[list[PickRows], dict[str, Any], tuple[str, ...]]:
    """Pick rows of ``frames`` (train-split rows, validation rows), what to record of their pools, and the stages
    they read (an index for LIS)."""
    from gloss_cli.data import load_items, load_split
    from gloss_cli.evaluate import TRAIN_TRANSITIONS
    from gloss_cli.index import open_index
    from gloss_cli.queries import lis_queries
    from gloss_cli.ranking import as_array, rank_users, transitions_lists
    from gloss_cli.transitions import own_pairs, transition_counts

    folder = project.path("data")
    items = load_items(folder)
    item_ids = items.get_column("item_id").to_list()
    titles = dict(zip(item_ids, items.get_column("title").to_list(), strict=True))
    key_of = {item: i for i, item in enumerate(item_ids)}
    k = recipe.candidates
    train = load_split(folder, "train")  # every user's sequence: what an evaluation's transitions know
    counts = transition_counts(train) if "transitions" in recipe.lists else None
    index: Any = None
    meta: dict[str, Any] = {"key": None, "stages": ()}
    if recipe.retrieves:
        index, meta = open_index(project, "bm25", query_cache=True, reporter=reporter)
    rng = random.Random(seed)
    out = []
    for frame in frames:
        histories = frame.get_column("history").to_list()
        queries = lis_queries(frame, titles).queries if "lis" in recipe.lists else []
        lead = None
        if counts is not None:  # less what the example's own target (and anything after it) added
            forget = own_pairs(train, frame)
            lead = transitions_lists(
                counts, histories, key_of, depth=k, exclude_seen=recipe.exclude_seen, forget=forget
            )
        seen = [{key_of[i] for i in h} for h in histories]
        merged = rank_users(recipe.pool(), queries, seen, k=k, retriever=index, lead=lead)
        rows = PickRows()
        targets = frame.get_column("target").to_list()
        for history, target, pool in zip(histories, targets, as_array(merged, k).tolist(), strict=True):
            keys = [int(x) for x in pool if x >= 0]
            if key_of[target] not in keys:
                rows.absent += 1
                keys = keys[: k - 1]
                keys.insert(rng.randint(0, len(keys)), key_of[target])
            rows.histories.append([titles[i] for i in history])
            rows.pools.append([titles[item_ids[x]] for x in keys])
            rows.answers.append(keys.index(key_of[target]))
        out.append(rows)
    info = {
        "pool": recipe.as_dict(),
        "candidates": k,
        "retriever": meta["key"],
        "transitions": (TRAIN_TRANSITIONS | {"less": "each train example's own pairs at or after its target"})
        if counts is not None
        else None,
        "order": POOL_ORDER,
        "target_absent": {"train": out[0].absent, "validation": out[1].absent if len(out) > 1 else 0},
    }
    return out, info, tuple(meta["stages"])


def letter_ids(tokenizer: Any, n: int) -> list[int]:
    """The vocabulary tokens of the first ``n`` letters, bare (no word-start mark): what follows the prompt's final
    newline in running text, for byte-level BPE and SentencePiece vocabularies alike."""
    ids = [tokenizer.convert_tokens_to_ids(letter) for letter in LETTERS[:n]]
    unknown = {None, tokenizer.unk_token_id}
    if any(i in unknown for i in ids) or len(set(ids)) != n:
        raise GlossError(
            f"The model's vocabulary has no token of its own for each letter A-{LETTERS[n - 1]}.",
            "Use another --model for --task pick.",
        )
    return ids


def fit_prompts(
    tokenizer: Any, histories: Sequence[Sequence[str]], pools: Sequence[Sequence[str]], budget: int
) -> tuple[list[list[int]], int]:
    """Pick prompts as token ids, each history cut (oldest items first, the pool whole) to ``budget`` tokens, and
    how many were cut."""
    ids = tokenizer([build_pick_prompt(h, p) for h, p in zip(histories, pools, strict=True)])["input_ids"]
    cut = 0
    for i, (history, pool) in enumerate(zip(histories, pools, strict=True)):
        if len(ids[i]) > budget:

            def count(titles: Sequence[str], pool: Sequence[str] = pool) -> int:
                return len(tokenizer(build_pick_prompt(titles, pool))["input_ids"])

            keep = fit_history(history, count, budget)
            ids[i] = tokenizer(build_pick_prompt(history[len(history) - keep :], pool))["input_ids"]
            cut += 1
    return [list(x) for x in ids], cut


def encode(tokenizer: Any, rows: PickRows, max_seq_len: int, candidates: int) -> Encoded:
    """Token ids of pick prompt + the answer's letter + EOS (``prompt_lens``: where the answer starts)."""
    letters = letter_ids(tokenizer, candidates)
    prompts, cut = fit_prompts(tokenizer, rows.histories, rows.pools, max_seq_len - 2)
    out = Encoded(truncated=cut)
    for prompt, answer in zip(prompts, rows.answers, strict=True):
        out.ids.append([*prompt, letters[answer], tokenizer.eos_token_id])
        out.prompt_lens.append(len(prompt))
    return out


def score_letters(
    model: Any, prompts: Sequence[Sequence[int]], sizes: Sequence[int], letters: list[int], *, pad_token_id: int
) -> list[list[float]]:
    """Per prompt, the log-softmax over its pool's ``sizes[i]`` letters of the next-token logits after it: one
    forward pass for the batch (right-padded, the answer position read per row)."""
    import torch

    from gloss_cli.train_loop import _split_head

    device = next(model.parameters()).device
    rows = [list(p) for p in prompts]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)], mask[i, : len(r)] = torch.tensor(r), 1
    ids, mask = ids.to(device), mask.to(device)
    last = torch.tensor([len(r) - 1 for r in rows], device=device)
    at = torch.arange(len(rows), device=device)
    split = _split_head(model)
    with torch.inference_mode():
        if split is not None:  # the LM head at the answer positions only, not over every position's vocabulary
            decoder, head, softcap = split
            hidden = decoder(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
            logits = head(hidden[at, last]).float()
            if softcap:
                logits = torch.tanh(logits / softcap) * softcap
        else:
            logits = model(input_ids=ids, attention_mask=mask).logits[at, last].float()
        picked = logits[:, torch.tensor(letters, device=device)]
        return [torch.log_softmax(picked[i, :n], dim=-1).tolist() if n else [] for i, n in enumerate(sizes)]
