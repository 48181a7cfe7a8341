"""`gloss sasrec`: SASRec (Kang & McAuley 2018), an ID-based sequential recommender, trained on gloss's own train
split so that ``gloss eval`` can score it under gloss's protocol beside transitions and the language model.

Libraries tried first (2026-12-06), none of which works with the pinned stack (``constraints.txt``: torch 2.13,
numpy 2.4, pandas 3.1, polars 2.1), so this module is a short plain-torch SASRec:

* RecBole 1.2.1 (its latest): pins ``colorlog==4.7.2`` and ``colorama==0.4.4`` and needs ``ray<=2.6.3``; its
  evaluator uses ``np.float`` (gone since numpy 1.24); its trainer reloads the best checkpoint, a pickled config
  included, with a bare ``torch.load`` (``weights_only=True`` by default since torch 2.6); its data pipeline makes
  its own leave-one-out split, not gloss's.
* RecTools 0.19.0 (``SASRecModel``): ``numpy<2`` and ``pandas<3`` on Python 3.11, plus pytorch-lightning.
* RePlay 0.22.0 (``SasRec``): ``pandas<3`` and ``polars<2``, plus lightning and pytorch-optimizer.

The model: item embeddings (key 0 = padding, shared with the output layer) scaled by sqrt(hidden), plus learned
positions; dropout; ``blocks`` pre-norm causal self-attention blocks (``nn.TransformerEncoderLayer``, feed-forward as
wide as the hidden size, as in the paper); a final LayerNorm. Each position predicts the next item.

The loss: ``ce`` (default), softmax cross-entropy over the whole catalog at every position, the common modern
variant (Klenitskiy & Vasilev 2023 and others find it well above the paper's), affordable on catalogs of ~12k items;
``bce``, the paper's: a sigmoid loss on the next item and one negative drawn uniformly from the catalog (never the
positive itself; the paper also avoids the user's other items), the loss of the published full-ranking numbers of
the S3-Rec line of work.

Data: each user's train sequence is the train split's longest example (history, then target), as
``gloss_cli.transitions`` counts them, so neither a validation nor a test item is ever seen; its last ``max_len + 1``
items make one training row. Validation ranks the validation split (its history is the user's train sequence) with
history items excluded; each setting stops when validation NDCG@10 has not improved for ``patience`` epochs, and the
setting of the best validation NDCG@10 is kept, at its best epoch.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import polars as pl
import torch
from torch import nn

from gloss_cli.console import Reporter
from gloss_cli.data import load_items, load_split
from gloss_cli.errors import GlossError
from gloss_cli.metrics import per_user, target_ranks
from gloss_cli.models import cpu_threads, pick_device
from gloss_cli.project import Project

STAGE = "sasrec"
WEIGHTS = "model.pt"  # a state_dict of tensors: torch.load(weights_only=True) reads it
META = "meta.json"
LOSSES = ("ce", "bce")
SELECT_K = 10  # settings and epochs are chosen on validation NDCG@10, history excluded
EVAL_BATCH = 512  # users scored at once
MISSING = ("No SASRec model in this project.", "Run 'gloss sasrec' first.")


@dataclass(frozen=True)
class Settings:
    hidden: int = 64  # embedding and attention width
    blocks: int = 2  # self-attention blocks
    heads: int = 1  # attention heads (must divide hidden)
    dropout: float = 0.2  # on embeddings, attention and feed-forward
    max_len: int = 50  # most recent items a sequence keeps
    lr: float = 1e-3  # Adam, betas (0.9, 0.98)
    batch_size: int = 128  # sequences per step
    loss: str = "ce"  # ce: softmax over every item; bce: one sampled negative (the paper's)
    epochs: int = 200  # at most
    patience: int = 5  # epochs without a better validation NDCG@10 before stopping
    seed: int = 0


GRID = {"dropout": (0.2, 0.5)}  # the default search: everything else at Settings' defaults


@dataclass
class Trial:
    settings: Settings
    epochs: list[dict[str, float]] = field(default_factory=list)  # per epoch: loss, validation metrics, seconds
    best_epoch: int = 0
    best: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0


@dataclass
class SasrecResult:
    chosen: Settings
    trials: list[Trial]
    device: str
    train_seconds: float
    folder: Path


class SASRec(nn.Module):
    def __init__(self, n_items: int, s: Settings) -> None:
        super().__init__()
        self.hidden = s.hidden
        self.items = nn.Embedding(n_items + 1, s.hidden, padding_idx=0)
        self.positions = nn.Embedding(s.max_len, s.hidden)
        self.dropout = nn.Dropout(s.dropout)
        layer = nn.TransformerEncoderLayer(
            s.hidden, s.heads, dim_feedforward=s.hidden, dropout=s.dropout, batch_first=True, norm_first=True
        )
        self.blocks = nn.TransformerEncoder(layer, s.blocks, norm=nn.LayerNorm(s.hidden), enable_nested_tensor=False)
        self.heads = s.heads
        nn.init.normal_(self.items.weight, std=s.hidden**-0.5)
        with torch.no_grad():
            self.items.weight[0].zero_()

    def forward(self, seq: torch.Tensor) -> torch.Tensor:
        """seq: (batch, L) item keys + 1, left-padded with 0, L <= max_len -> (batch, L, hidden)."""
        length = seq.shape[1]
        first = self.positions.num_embeddings - length  # the last item always sits at the last position
        pos = torch.arange(first, first + length, device=seq.device)
        real = seq > 0
        x = self.dropout(self.items(seq) * math.sqrt(self.hidden) + self.positions(pos)) * real.unsqueeze(-1)
        # causal, never a padded key; every position may see itself, so no row is fully masked (no NaN)
        allowed = torch.tril(torch.ones(length, length, dtype=torch.bool, device=seq.device)) & real[:, None, :]
        allowed |= torch.eye(length, dtype=torch.bool, device=seq.device)
        mask = (~allowed).repeat_interleave(self.heads, dim=0)
        return self.blocks(x, mask=mask) * real.unsqueeze(-1)

    def scores(self, seq: torch.Tensor) -> torch.Tensor:
        """The next item's score for every item (batch, n_items), from each sequence's last position."""
        return self(seq)[:, -1] @ self.items.weight[1:].T


def train_sequences(train: pl.DataFrame) -> pl.DataFrame:
    """user_id, seq: each user's longest train example, history then target (the train split only)."""
    return (
        train.select("user_id", seq=pl.concat_list(pl.col("history"), pl.col("target")))
        .sort(pl.col("seq").list.len(), descending=True, maintain_order=True)
        .unique("user_id", keep="first", maintain_order=True)
    )


def encode(seqs: Sequence[Sequence[str]], key_of: dict[str, int], width: int) -> npt.NDArray[np.int64]:
    """Each sequence's last ``width`` items as keys + 1, left-padded with 0: (n, width)."""
    out = np.zeros((len(seqs), width), dtype=np.int64)
    for row, seq in enumerate(seqs):
        tail = [key_of[i] + 1 for i in seq[-width:]]
        if tail:
            out[row, width - len(tail) :] = tail
    return out


def items_hash(item_ids: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(item_ids).encode()).hexdigest()[:16]


def rank(
    model: SASRec,
    histories: Sequence[Sequence[str]],
    key_of: dict[str, int],
    *,
    depth: int,
    exclude_seen: bool,
    device: str,
) -> npt.NDArray[np.int64]:
    """Per history, the ``depth`` best item keys by the model's score, best first (equal scores: by item key); none
    for an empty history (a typed-in one of no catalog title), which the model would rank by its padding alone."""
    model.eval()
    width = model.positions.num_embeddings
    out = np.full((len(histories), depth), -1, dtype=np.int64)
    with torch.no_grad():
        for start in range(0, len(histories), EVAL_BATCH):
            part = histories[start : start + EVAL_BATCH]
            seq = torch.from_numpy(encode(part, key_of, width)).to(device)
            scores = model.scores(seq)
            if exclude_seen:
                for row, history in enumerate(part):  # the whole history, not only its last max_len items
                    scores[row, [key_of[i] for i in history]] = -torch.inf
            order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :depth]
            keep = (torch.gather(scores, 1, order) > -torch.inf) & (seq > 0).any(dim=1, keepdim=True)
            out[start : start + len(part)] = torch.where(keep, order, -1).cpu().numpy()
    return out


def _validate(model: SASRec, split: pl.DataFrame, key_of: dict[str, int], device: str) -> dict[str, float]:
    ranked = rank(
        model, split.get_column("history").to_list(), key_of, depth=SELECT_K, exclude_seen=True, device=device
    )
    ranks = target_ranks(ranked, np.array([key_of[t] for t in split.get_column("target").to_list()]))
    values = per_user(ranks, [SELECT_K])
    return {m: float(values[m].mean()) for m in (f"recall@{SELECT_K}", f"ndcg@{SELECT_K}")}


def _loss(model: SASRec, batch: torch.Tensor, s: Settings, n_items: int, gen: torch.Generator) -> torch.Tensor:
    inputs, targets = batch[:, :-1], batch[:, 1:]
    real = targets > 0
    hidden = model(inputs)[real]  # (positions, hidden)
    wanted = targets[real] - 1
    if s.loss == "ce":
        return nn.functional.cross_entropy(hidden @ model.items.weight[1:].T, wanted)
    negative = torch.randint(n_items - 1, wanted.shape, generator=gen, device="cpu").to(wanted.device)
    negative += (negative >= wanted).long()  # uniform over every item but the positive
    pos = (hidden * model.items.weight[wanted + 1]).sum(-1)
    neg = (hidden * model.items.weight[negative + 1]).sum(-1)
    bce = nn.functional.binary_cross_entropy_with_logits
    return bce(pos, torch.ones_like(pos)) + bce(neg, torch.zeros_like(neg))


def fit(
    s: Settings,
    rows: npt.NDArray[np.int64],
    validation: pl.DataFrame,
    key_of: dict[str, int],
    *,
    device: str,
    reporter: Reporter,
    label: str = "",
) -> tuple[Trial, dict[str, torch.Tensor]]:
    """Train one setting with early stopping on validation NDCG@10; the trial and its best epoch's weights."""
    torch.manual_seed(s.seed)
    gen = torch.Generator().manual_seed(s.seed)
    n_items = len(key_of)
    model = SASRec(n_items, s).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=s.lr, betas=(0.9, 0.98))
    data = torch.from_numpy(rows)
    trial, best_state = Trial(s), copy.deepcopy(model.state_dict())
    t0 = time.perf_counter()
    steps = math.ceil(len(rows) / s.batch_size)
    for epoch in range(1, s.epochs + 1):
        t1, total = time.perf_counter(), 0.0
        model.train()
        order = torch.randperm(len(rows), generator=gen)
        with reporter.progress(f"sasrec {label}epoch {epoch}", steps) as tick:
            for start in range(0, len(rows), s.batch_size):
                batch = data[order[start : start + s.batch_size]]
                batch = batch[:, int((batch > 0).any(0).int().argmax()) :].to(device)  # drop all-padding columns
                loss = _loss(model, batch, s, n_items, gen)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total += float(loss.detach())
                tick.advance()
        scores = _validate(model, validation, key_of, device)
        record = {"epoch": epoch, "loss": round(total / steps, 5), **scores}
        record["seconds"] = round(time.perf_counter() - t1, 2)
        trial.epochs.append(record)
        key = f"ndcg@{SELECT_K}"
        improved = not trial.best or scores[key] > trial.best[key]
        reporter.info(
            f"sasrec {label}epoch {epoch}: loss {record['loss']:.4f}, validation recall@{SELECT_K} "
            f"{scores[f'recall@{SELECT_K}']:.4f}, ndcg@{SELECT_K} {scores[key]:.4f} ({record['seconds']:.0f} s)"
            + (" *" if improved else "")
        )
        if improved:
            trial.best, trial.best_epoch = scores, epoch
            best_state = copy.deepcopy(model.state_dict())
        elif epoch - trial.best_epoch >= s.patience:
            break
    trial.seconds = round(time.perf_counter() - t0, 2)
    return trial, best_state


def grid(base: Settings, values: Mapping[str, Sequence[Any]]) -> list[Settings]:
    """Every combination of ``values`` (setting -> the values to try) on top of ``base``, checked."""
    keys = sorted(values)
    tried = [
        replace(base, **dict(zip(keys, combo, strict=True))) for combo in itertools.product(*(values[k] for k in keys))
    ]
    for s in tried:
        check(s)
    return list(dict.fromkeys(tried))


def check(s: Settings) -> None:
    if s.loss not in LOSSES:
        raise GlossError(f"Unknown --loss '{s.loss}'.", f"Use one of: {', '.join(LOSSES)}.")
    for name in ("hidden", "blocks", "heads", "max_len", "batch_size", "epochs", "patience"):
        if getattr(s, name) < 1:
            raise GlossError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(s, name)}.", "E.g. 1.")
    if s.hidden % s.heads:
        raise GlossError(f"--heads {s.heads} does not divide --hidden {s.hidden}.", "E.g. --heads 1 or 2.")
    if not 0 <= s.dropout < 1:
        raise GlossError(f"--dropout {s.dropout} is not in [0, 1).", "E.g. --dropout 0.2.")
    if not s.lr > 0:
        raise GlossError(f"--lr {s.lr} is not above 0.", "E.g. --lr 0.001.")


def run(
    project: Project,
    settings: list[Settings],
    *,
    command: str = "gloss sasrec",
    reporter: Reporter | None = None,
) -> SasrecResult:
    """Train every setting, keep the best on validation, and write ``sasrec/`` (model.pt, meta.json)."""
    reporter = reporter or Reporter()
    if not settings:
        raise GlossError("No SASRec setting to train.", "Run 'gloss sasrec' with its defaults.")
    for s in settings:
        check(s)
    project.require("data")
    items = load_items(project.path("data")).get_column("item_id").to_list()
    key_of = {item: i for i, item in enumerate(items)}
    train = train_sequences(load_split(project.path("data"), "train"))
    validation = load_split(project.path("data"), "validation")
    if validation.height == 0:
        raise GlossError(
            "The validation split is empty: SASRec's settings and epochs are chosen on it.",
            "Use a dataset with more users (5 % of them are validation users).",
        )
    device = pick_device()
    params = {"grid": [asdict(s) for s in settings], "select": f"validation ndcg@{SELECT_K}, history excluded"}
    with project.run_stage(STAGE, params, command=command, upstream=("data",), libraries=("torch", "numpy")) as stage:
        t0 = time.perf_counter()
        trials: list[Trial] = []
        best: tuple[float, int, dict[str, torch.Tensor]] | None = None
        for i, s in enumerate(settings):
            rows = encode(train.get_column("seq").to_list(), key_of, s.max_len + 1)
            label = f"{i + 1}/{len(settings)} " if len(settings) > 1 else ""
            reporter.info(f"sasrec {label}{changed(s, settings)} on {len(rows):,} train sequences, {device}")
            trial, state = fit(s, rows, validation, key_of, device=device, reporter=reporter, label=label)
            trials.append(trial)
            value = trial.best[f"ndcg@{SELECT_K}"]
            if best is None or value > best[0]:
                best = (value, i, state)
        assert best is not None
        chosen = trials[best[1]]
        train_seconds = round(time.perf_counter() - t0, 2)
        torch.save({k: v.cpu() for k, v in best[2].items()}, stage.dir / WEIGHTS)
        meta = {
            "model": "SASRec (Kang & McAuley 2018)",
            "settings": asdict(chosen.settings),
            "best_epoch": chosen.best_epoch,
            "epochs_run": len(chosen.epochs),
            "validation": chosen.best,
            "trials": [
                asdict(t.settings)
                | {"best_epoch": t.best_epoch, "epochs_run": len(t.epochs), "validation": t.best}
                | {"seconds": t.seconds, "epochs": t.epochs}
                for t in trials
            ],
            "select": params["select"],
            "validation_users": validation.height,
            "train_sequences": len(train),
            "items": len(items),
            "items_sha256": items_hash(items),
            "train_seconds": train_seconds,
            "device": device,
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
        }
        (stage.dir / META).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        stage.metrics = {"validation": chosen.best, "best_epoch": chosen.best_epoch, "train_seconds": train_seconds}
    return SasrecResult(chosen.settings, trials, device, train_seconds, project.path(STAGE))


def changed(s: Settings, settings: list[Settings]) -> str:
    """The settings that differ across the grid, as words (all of them for a single setting)."""
    varying = {k for k in asdict(s) if len({getattr(t, k) for t in settings}) > 1} or set(asdict(s))
    return ", ".join(f"{k}={v}" for k, v in asdict(s).items() if k in varying)


def require(project: Project) -> dict[str, Any]:
    """The sasrec stage's record; one line when there is none, its files changed, or it was trained on other data."""
    if project.stage(STAGE) is None:
        raise GlossError(*MISSING)
    record = project.require(STAGE, "gloss sasrec")
    data = project.require("data")
    if record.get("upstream", {}).get("data") != data["fingerprint"]:
        raise GlossError(
            "The SASRec model was trained on other data: stage 'data' was re-run since 'gloss sasrec'.",
            "Run 'gloss sasrec' again.",
        )
    return record


def load(project: Project, device: str | None = None) -> tuple[SASRec, dict[str, Any], str]:
    """The trained model on ``device`` (default: CUDA when there is one), its meta and the device (:func:`require`
    first)."""
    require(project)
    meta = json.loads(project.path(f"{STAGE}/{META}").read_text(encoding="utf-8"))
    items = load_items(project.path("data")).get_column("item_id").to_list()
    if meta["items_sha256"] != items_hash(items):  # the fingerprint should have said so: a guard, not a check
        raise GlossError("The SASRec model's items are not the project's.", "Run 'gloss sasrec' again.")
    device = device or pick_device()
    if device == "cpu" and (threads := cpu_threads()):  # GLOSS_THREADS, as pick_device would have set it
        torch.set_num_threads(threads)
    model = SASRec(len(items), Settings(**meta["settings"]))
    model.load_state_dict(torch.load(project.path(f"{STAGE}/{WEIGHTS}"), map_location="cpu", weights_only=True))
    return model.to(device).eval(), meta, device


def lists(
    project: Project, histories: Sequence[Sequence[str]], key_of: dict[str, int], *, depth: int, exclude_seen: bool
) -> npt.NDArray[np.int64]:
    """Per history, the trained model's first ``depth`` item keys, -1 padded (a recipe's ``sasrec`` list)."""
    model, _, device = load(project)
    return rank(model, histories, key_of, depth=depth, exclude_seen=exclude_seen, device=device)
