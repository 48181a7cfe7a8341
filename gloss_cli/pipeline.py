"""`gloss run`: data -> train -> index -> generate -> eval -> segments in one command, skipping what is done.

The CPU default trains for a few minutes (a time budget, recorded so the run replays anywhere) and evaluates a few
hundred test users (benchmarks/main_job.py measures it end to end); ``full`` is the paper-scale experiment (every
user, early stopping on validation loss), meant for a GPU. A stage is skipped when its record is done, not stale,
and was made with the same parameters.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from gloss_cli.console import Reporter
from gloss_cli.errors import GlossError
from gloss_cli.project import Project
from gloss_cli.recipe import PRESETS, Recipe, parse


@dataclass(frozen=True)
class RunPlan:
    """What `gloss run` runs. The CPU default is sized by time, not by work (CPU speed varies several-fold between
    machines): LoRA for ``train_minutes`` on short prompts in bf16 where the CPU has it, 2 beams for ``eval_users``
    test users; its numbers are in benchmarks/main_job.json. ``full`` is the recipe that did best on validation on
    an H100/H200 (docs/RESULTS.md): full fine-tuning, completion loss, every user, 5 beams."""

    dataset: str = "beauty"
    full: bool = False
    train_users: int = 2000  # the first N train users (0 = all); the time budget decides how many are seen
    train_minutes: float = 3.0  # CPU default: a time budget for training (0: none); the schedule is fitted to it
    epochs: int = 1  # CPU default; full: 3 (validation loss kept falling to epoch 3; early stopping guards)
    eval_users: int = 300  # test users generated for and evaluated (0 = all); 200 left a CI touching 0
    retriever: str = "bm25"
    model: str | None = None
    backend: str | None = None  # None: on a CPU llama.cpp, else ct2, when installed; else transformers (recommend's)
    method: str = "lora"  # full: full fine-tuning
    loss: str = "completion"  # target tokens only: better on validation than full-text in every run so far
    lr: float = 2e-3  # CPU: validation loss after 3 min: 5e-4 3.78, 1e-3 3.68, 2e-3 3.58, 4e-3 3.55; full: 2e-4
    batch_size: int = 8  # full: 64
    max_seq_len: int = 256  # CPU: the user's latest items only (a fifth of the tokens per example); full: 1024
    beams: int = 2  # CPU: the declared row uses 2 queries, and 2 beams cost half of 5; full: the paper's 5
    # CPU: a beam ends at the end of its title line too (a short-trained model rarely writes EOS: gloss recommend
    # took 1.9 s a call without it, 1.5 s with it, benchmarks/README.md); full: the paper's search, EOS only
    stop_at_newline: bool = True
    dtype: str | None = None  # None: bf16 on CUDA and on CPUs that have it in hardware, else fp32
    recipe: str = "gloss"  # the declared row (gloss_cli.recipe: a preset or the explicit form), first in the table

    @classmethod
    def make(cls, *, full: bool, **overrides: Any) -> RunPlan:
        base = cls()
        if full:
            base = cls(
                full=True,
                train_users=0,
                train_minutes=0.0,
                epochs=3,
                eval_users=0,
                method="full",
                lr=2e-4,
                batch_size=64,
                max_seq_len=1024,
                beams=5,
                stop_at_newline=False,
            )
        return cls(**(asdict(base) | {k: v for k, v in overrides.items() if v is not None}))


# The rows of `gloss run`'s table, as recipes (gloss_cli.recipe): the declared one first (transitions + LIS + the
# model's first 2 queries, fused, history excluded: the pick docs/RESULTS.md reports, chosen on validation in session
# 10); then what it is made of, and the paper's protocol. Each row's key is its preset's name.
EVALS = (
    ("gloss", "transitions + LIS + model"),
    ("no-model", "transitions + LIS (no model)"),
    ("lis", "LIS"),
    ("transitions", "transitions (no model)"),
    ("model", "model alone"),
    ("paper", "model alone"),
    ("lis-paper", "LIS"),
)


def rows_of(declared: Recipe) -> list[tuple[str, str]]:
    """The table's rows: the declared recipe first (gloss unless --recipe says otherwise), then the others."""
    first = (declared.name(), "transitions + LIS + model" if declared.name() == "gloss" else "declared recipe")
    return [first, *((key, label) for key, label in EVALS[1:] if key != declared.name())]


# Paired over the same users: what the declared row gains over LIS and over its no-model part, and the model's own
# queries against LIS under the paper's protocol
COMPARISONS = (("gloss", "lis"), ("gloss", "no-model"), ("paper", "lis-paper"))


@dataclass
class RunSummary:
    steps: list[tuple[str, str]] = field(default_factory=list)  # (stage, "ran" | "skipped")
    rows: list[dict[str, Any]] = field(default_factory=list)  # eval runs: name, protocol, users, metrics
    comparisons: list[dict[str, Any]] = field(default_factory=list)  # paired differences (COMPARISONS)
    train: dict[str, Any] = field(default_factory=dict)  # the train stage's record: steps, speed, stop, replay
    plot: Path | None = None


def _fresh(project: Project, name: str, params: dict[str, Any]) -> bool:
    """Done, not stale, and made with these parameters (a train setting its record predates counts as its default:
    train_config.ADDED_LATER)."""
    from gloss_cli.train_config import ADDED_LATER

    record = project.stage(name)
    recorded = (ADDED_LATER if name == "train" else {}) | (record["params"] if record else {})
    if record is None or any(params.get(k) != recorded.get(k) for k in params):
        return False
    return next((s.state for s in project.status() if s.name == name), "missing") == "done"


def run_all(project: Project, plan: RunPlan, *, reporter: Reporter | None = None) -> RunSummary:
    """Every stage in order (the caller holds the project lock)."""
    from gloss_cli import data, evaluate, generate, index, segments, train
    from gloss_cli.sources import dataset_info

    reporter = reporter or Reporter()
    declared = parse(plan.recipe)  # before any work: a recipe the run cannot compute is one line
    if declared.reranked:
        raise GlossError(
            f"gloss run does not score pools: recipe {declared.name()} needs gloss rerank.",
            "Use a recipe with order=retrieval, or gloss rerank then gloss eval --recipe for this one.",
        )
    if declared.queries > plan.beams:
        raise GlossError(
            f"Recipe {declared.name()} reads {declared.queries} queries but this plan generates {plan.beams} per user.",
            f"Use queries={plan.beams} or fewer (--full generates 5).",
        )
    summary = RunSummary()

    def step(name: str, fresh: bool) -> bool:
        summary.steps.append((name, "skipped" if fresh else "ran"))
        reporter.info(f"{name}: {'up to date, skipped' if fresh else 'running'}")
        return not fresh

    info = dataset_info(plan.dataset)
    # gloss run keeps the paper's order of same-day items: a project made with 'gloss data --ties shuffle' is redone
    # (a record from before --ties used the file's order)
    file_ties = (project.stage("data") or {}).get("params", {}).get("ties", "file") == "file"
    data_params = {"dataset": info.name, "dedup": False, "train_examples": "last"}
    if step("data", file_ties and _fresh(project, "data", data_params)):
        data.run(project, info, None, command=f"gloss data --dataset {info.name}", reporter=reporter)

    from gloss_cli.models import fast_dtype, pick_device

    dtype = plan.dtype or fast_dtype(pick_device())
    overrides = {
        "epochs": plan.epochs,
        "limit_users": plan.train_users,
        "max_minutes": plan.train_minutes,
        "model": plan.model,
        "method": plan.method,
        "loss": plan.loss,
        "lr": plan.lr,
        "batch_size": plan.batch_size,
        "max_seq_len": plan.max_seq_len,
        "dtype": dtype,
    }
    config = train.load_config(None, overrides)
    if step("train", _fresh(project, "train", asdict(config))):
        if plan.train_minutes:
            reporter.info(
                f"training for {plan.train_minutes:g} minutes (a time budget: the machine's speed decides how many "
                "examples are seen; the steps are recorded, and gloss train --stop-at-step --schedule-steps replays "
                "them on any machine)"
            )
        train.run(project, config, command="gloss train " + _flags(overrides), reporter=reporter)
    summary.train = (project.stage("train") or {}).get("metrics", {})

    key = index.index_key(plan.retriever)
    if step(f"index/{key}", _fresh(project, f"index/{key}", {"retriever": plan.retriever})):
        index.run(project, plan.retriever, command=f"gloss index --retriever {plan.retriever}", reporter=reporter)

    backend = plan.backend or generate.default_backend()
    # ct2 generates in its own int8 unless a dtype was asked for: the default training dtype (bf16 where the CPU has
    # it) is transformers' choice, and CTranslate2 refuses a bf16 its CPU build lacks
    generate_dtype = "auto" if backend == "ct2" and plan.dtype is None else dtype
    options = generate.GenerateOptions(
        backend=backend,
        beams=plan.beams,
        num_return=plan.beams,
        dtype=generate_dtype,
        stop_at_newline=plan.stop_at_newline,
    )
    wanted = {
        "limit": plan.eval_users,
        "backend": backend,
        "beams": plan.beams,
        "num_return": plan.beams,
        "stop_at_newline": plan.stop_at_newline,
    }
    if step("generate/test", _fresh(project, "generate/test", wanted)):
        # a file from another model or other settings starts again; the same settings' file resumes
        before = (project.stage("generate/test") or {}).get("params", {})
        retrained = ("train", "ran") in summary.steps
        generate.run(
            project,
            "test",
            options,
            limit=plan.eval_users,
            overwrite=retrained or (bool(before) and any(before.get(k) != v for k, v in wanted.items())),
            command=f"gloss generate --split test --limit {plan.eval_users} --backend {backend} --beams "
            f"{plan.beams} --num-return {plan.beams} --dtype {generate_dtype}"
            + (" --stop-at-newline" if plan.stop_at_newline else ""),
            reporter=reporter,
        )

    results = {}
    for key, _ in rows_of(declared):
        recipe = declared if key == declared.name() else PRESETS[key]
        if recipe.uses_model and recipe.queries > plan.beams and key != declared.name():
            recipe = dataclasses.replace(recipe, queries=plan.beams)  # the first N of what was generated
        results[key] = evaluate.run(
            project, recipe, split="test", retriever=plan.retriever, command="gloss run", reporter=reporter
        )
    summary.steps.append(("eval", f"{len(results)} runs"))
    labels = dict(rows_of(declared))
    summary.rows = [
        {
            "key": key,
            "label": labels[key],
            "run": r.name,
            "recipe": r.recipe.as_dict(),
            "exclude_seen": r.exclude_seen,
            "users": r.users,
            "description": r.describe(),
            "ties": r.ties,
            **r.metrics,
        }
        for key, r in results.items()
    ]
    first = declared.name()
    pairs = [(first if a == "gloss" else a, b) for a, b in COMPARISONS]
    summary.comparisons = [_compare(results[a], results[b], a, b) for a, b in pairs if a != b]
    report = segments.run(project, runs=[r.name for r in results.values()], command="gloss segments")
    summary.steps.append(("segments", "ran"))
    summary.plot = report.plot
    return summary


def _compare(
    a: Any, b: Any, key_a: str, key_b: str, *, metrics: tuple[str, ...] = ("recall@5", "ndcg@5")
) -> dict[str, Any]:
    """Row A - row B over the same users, with paired bootstrap CIs (Recall@5 and NDCG@5 unless ``metrics``)."""
    import polars as pl

    from gloss_cli.metrics import paired_difference

    left = pl.read_parquet(a.folder / "per_user.parquet")
    right = pl.read_parquet(b.folder / "per_user.parquet")
    both = left.join(right, on="user_id", suffix="_b")  # users=generated: the same users; the join makes sure
    out: dict[str, Any] = {"a": key_a, "b": key_b, "users": both.height}
    for metric in metrics:
        out[metric] = paired_difference(both[metric].to_numpy(), both[f"{metric}_b"].to_numpy())
    return out


def _flags(values: dict[str, Any]) -> str:
    return " ".join(f"--{k.replace('_', '-')} {v}" for k, v in values.items() if v is not None)
