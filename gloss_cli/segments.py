"""`gloss segments`: per-user metrics of eval runs split by how many interactions a user has.

As in the paper, a user's count is their number of interactions with exact duplicates removed; cold-start users
have at most ``cold`` (5), power users more than ``power`` (14 on Beauty, 13 on Toys and Sports).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl

from gloss_cli.errors import GlossError
from gloss_cli.project import Project

COLD = 5
POWER = {"beauty": 14, "toys": 13, "sports": 13}
SEGMENTS = ("cold-start", "regular", "power")


@dataclass
class SegmentReport:
    k: int
    cold: int
    power: int
    runs: list[str]
    table: pl.DataFrame  # run, segment, users, share, recall@k, ndcg@k
    plot: Path | None


def eval_runs(project: Project, runs: list[str] | None) -> list[str]:
    stages = project.manifest()["stages"]
    available = [name.removeprefix("eval/") for name in stages if name.startswith("eval/")]
    if not available:
        raise GlossError(
            f"No eval runs in {project.root}.", "Run 'gloss eval --baseline lis' (and a model eval) first."
        )
    for run in runs or []:
        if run not in available:
            raise GlossError(f"No eval run '{run}'.", f"Available: {', '.join(available)}.")
    return list(runs) if runs else available


def segment_table(
    per_user: dict[str, pl.DataFrame], counts: pl.DataFrame, k: int, cold: int, power: int
) -> pl.DataFrame:
    segment = (
        pl.when(pl.col("n_dedup") <= cold)
        .then(pl.lit("cold-start"))
        .when(pl.col("n_dedup") > power)
        .then(pl.lit("power"))
        .otherwise(pl.lit("regular"))
    )
    frames = []
    for run, frame in per_user.items():
        if f"recall@{k}" not in frame.columns:
            raise GlossError(f"Eval run '{run}' has no metrics at K={k}.", f"Re-run it with -k {k}, or pass -k.")
        joined = frame.join(counts, on="user_id", how="left")
        if joined.get_column("n_dedup").null_count():
            raise GlossError(f"Eval run '{run}' has users that are not in this project's data.", "Re-run 'gloss eval'.")
        stats = (
            joined.with_columns(segment=segment)
            .group_by("segment")
            .agg(users=pl.len(), recall=pl.col(f"recall@{k}").mean(), ndcg=pl.col(f"ndcg@{k}").mean())
        )
        # every segment appears, an empty one with 0 users and no metric values
        frames.append(
            pl.DataFrame({"segment": list(SEGMENTS)})
            .join(stats, on="segment", how="left")
            .with_columns(pl.col("users").fill_null(0).cast(pl.UInt32))
            .with_columns(run=pl.lit(run), share=pl.col("users") / pl.col("users").sum())
        )
    order = {name: i for i, name in enumerate(SEGMENTS)}
    return (
        pl.concat(frames)
        .rename({"recall": f"recall@{k}", "ndcg": f"ndcg@{k}"})
        .with_columns(order=pl.col("segment").replace_strict(order, return_dtype=pl.Int32))
        .sort("run", "order")
        .select("run", "segment", "users", "share", f"recall@{k}", f"ndcg@{k}")
    )


def plot(table: pl.DataFrame, k: int, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt
    import numpy as np

    runs = table.get_column("run").unique(maintain_order=True).to_list()
    columns = min(len(runs), 4)
    legend_rows = -(-len(runs) // columns)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4 + 0.25 * legend_rows))
    width = 0.8 / len(runs)
    for ax, metric in zip(axes, (f"recall@{k}", f"ndcg@{k}"), strict=True):
        for i, run in enumerate(runs):
            rows = table.filter(pl.col("run") == run)
            ax.bar(
                np.arange(len(SEGMENTS)) + i * width, rows.get_column(metric).fill_null(0).to_list(), width, label=run
            )
        labels = [
            f"{s}\n({n:,} users)"
            for s, n in zip(SEGMENTS, table.filter(pl.col("run") == runs[0]).get_column("users"), strict=True)
        ]
        ax.set_xticks(np.arange(len(SEGMENTS)) + width * (len(runs) - 1) / 2, labels)
        ax.set_title(metric)
        ax.grid(axis="y", alpha=0.3)
    # below the plots, where it hides no bar whatever the number of runs
    handles, names = axes[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=columns, fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.06 * legend_rows / (1 + 0.06 * legend_rows) + 0.02, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(
    project: Project,
    *,
    runs: list[str] | None = None,
    k: int = 5,
    cold: int | None = None,
    power: int | None = None,
    command: str = "gloss segments",
) -> SegmentReport:
    data = project.require("data")
    dataset = data["params"]["dataset"]
    cold = COLD if cold is None else cold
    power = POWER.get(dataset, 13) if power is None else power
    if not 0 < cold < power:
        raise GlossError(f"Need 0 < --cold ({cold}) < --power ({power}).", "E.g. --cold 5 --power 14.")
    names = eval_runs(project, runs)
    counts = pl.read_parquet(project.path("data/sequences.parquet"), columns=["user_id", "n_dedup"])
    per_user = {name: pl.read_parquet(project.path(f"eval/{name}/per_user.parquet")) for name in names}
    table = segment_table(per_user, counts, k, cold, power)
    params = {"runs": names, "k": k, "cold": cold, "power": power, "count": "interactions, exact duplicates removed"}
    upstream = ("data", *(f"eval/{name}" for name in names))
    with project.run_stage("segments", params, command=command, upstream=upstream, libraries=("matplotlib",)) as stage:
        table.write_parquet(stage.dir / "segments.parquet")
        (stage.dir / "segments.json").write_text(json.dumps(table.to_dicts(), indent=2) + "\n", encoding="utf-8")
        title = f"{dataset}: users by interactions (cold-start <= {cold} < regular <= {power} < power), K={k}"
        plot(table, k, stage.dir / "segments.png", title)
        stage.metrics = {"segments": table.to_dicts()}
    return SegmentReport(k, cold, power, names, table, project.path("segments/segments.png"))


def as_json(report: SegmentReport) -> dict[str, Any]:
    return {
        "k": report.k,
        "cold": report.cold,
        "power": report.power,
        "runs": report.runs,
        "segments": report.table.to_dicts(),
        "plot": str(report.plot),
    }
