"""`gloss run`: data -> train -> index -> generate -> eval -> segments in one command, skipping what is done.

The CPU default uses a subset of users and one epoch (not timed end to end yet; CPU training ran at 18-58
tokens/s on 2 shared cores); ``full`` is the
paper-scale experiment (every user, early stopping on validation loss), meant for a GPU. A stage is skipped when
its record is done, not stale, and was made with the same parameters.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from gloss_cli.console import Reporter
from gloss_cli.project import Project


@dataclass(frozen=True)
class RunPlan:
    """What `gloss run` runs. The CPU default took 17 minutes on 2 idle cores (README); ``full`` is the
    recipe that did best on validation on an H100/H200 (docs/RESULTS.md): full fine-tuning, completion loss."""

    dataset: str = "beauty"
    full: bool = False
    train_users: int = 800  # CPU default: the first N train users (0 = all)
    epochs: int = 1  # CPU default; full: 3 (validation loss kept falling to epoch 3; early stopping guards)
    eval_users: int = 200  # test users generated for and evaluated (0 = all)
    retriever: str = "bm25"
    model: str | None = None
    backend: str | None = None  # None: llama.cpp on a CPU when installed, else transformers (recommend's default)
    method: str = "lora"  # full: full fine-tuning
    loss: str = "completion"  # target tokens only: better on validation than full-text in every run so far
    lr: float = 5e-4  # CPU: one short epoch of LoRA needs a large step; full: 2e-4
    batch_size: int = 8  # full: 64

    @classmethod
    def make(cls, *, full: bool, **overrides: Any) -> RunPlan:
        base = cls()
        if full:
            base = cls(full=True, train_users=0, epochs=3, eval_users=0, method="full", lr=2e-4, batch_size=64)
        return cls(**(asdict(base) | {k: v for k, v in overrides.items() if v is not None}))


@dataclass
class RunSummary:
    steps: list[tuple[str, str]] = field(default_factory=list)  # (stage, "ran" | "skipped")
    rows: list[dict[str, Any]] = field(default_factory=list)  # eval runs: name, protocol, users, metrics
    plot: Path | None = None


def _fresh(project: Project, name: str, params: dict[str, Any]) -> bool:
    """Done, not stale, and made with these parameters."""
    record = project.stage(name)
    if record is None or any(params.get(k) != record["params"].get(k) for k in params):
        return False
    return next((s.state for s in project.status() if s.name == name), "missing") == "done"


def run_all(project: Project, plan: RunPlan, *, reporter: Reporter | None = None) -> RunSummary:
    """Every stage in order (the caller holds the project lock)."""
    from gloss_cli import data, evaluate, generate, index, segments, train
    from gloss_cli.sources import dataset_info

    reporter = reporter or Reporter()
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

    overrides = {
        "epochs": plan.epochs,
        "limit_users": plan.train_users,
        "model": plan.model,
        "method": plan.method,
        "loss": plan.loss,
        "lr": plan.lr,
        "batch_size": plan.batch_size,
    }
    config = train.load_config(None, overrides)
    if step("train", _fresh(project, "train", asdict(config))):
        train.run(project, config, command="gloss train " + _flags(overrides), reporter=reporter)

    key = index.index_key(plan.retriever)
    if step(f"index/{key}", _fresh(project, f"index/{key}", {"retriever": plan.retriever})):
        index.run(project, plan.retriever, command=f"gloss index --retriever {plan.retriever}", reporter=reporter)

    backend = plan.backend or generate.default_backend()
    options = generate.GenerateOptions(backend=backend)
    if step("generate/test", _fresh(project, "generate/test", {"limit": plan.eval_users, "backend": backend})):
        generate.run(
            project,
            "test",
            options,
            limit=plan.eval_users,
            command=f"gloss generate --split test --limit {plan.eval_users} --backend {backend}",
            reporter=reporter,
        )

    results = []
    # model and LIS under both protocols, then the two fused (gloss eval --with-lis); the transitions baseline
    # (no model), then it fused before LIS + model (--with-transitions); all on the same users
    runs: list[tuple[str | None, str, bool, bool, bool]] = [(None, "paper", False, False, False)]
    runs += [(None, "fused", True, False, False)]
    runs += [("lis", "paper", False, False, False), ("lis", "fused", True, False, False)]
    runs += [(None, "fused", True, True, False), ("transitions", "fused", True, False, False)]
    runs += [(None, "fused", True, True, True)]
    for baseline, protocol, exclude, with_lis, with_transitions in runs:
        results.append(
            evaluate.run(
                project,
                split="test",
                retriever=plan.retriever,
                protocol=protocol,
                exclude_seen=exclude,
                baseline=baseline,
                match_generated=True,
                with_lis=with_lis,
                with_transitions=with_transitions,
                command="gloss run",
                reporter=reporter,
            )
        )
    summary.steps.append(("eval", f"{len(results)} runs"))
    summary.rows = [
        {
            "run": r.name,
            "source": r.source,
            "protocol": r.protocol,
            "exclude_seen": r.exclude_seen,
            "users": r.users,
            "description": r.describe(),
            "ties": r.ties,
            **r.metrics,
        }
        for r in results
    ]
    report = segments.run(project, runs=[r.name for r in results], command="gloss segments")
    summary.steps.append(("segments", "ran"))
    summary.plot = report.plot
    return summary


def _flags(values: dict[str, Any]) -> str:
    return " ".join(f"--{k.replace('_', '-')} {v}" for k, v in values.items() if v is not None)
