"""`gloss segments`: per-user metrics of eval runs split by how many interactions a user has, or by same-day ties.

As in the paper, a user's count is their number of interactions with exact duplicates removed; cold-start users
have at most ``cold`` (5), power users more than ``power`` (14 on Beauty, 13 on Toys and Sports).

``by="ties"``: ``same-day`` users are those whose target (the held-out item of the run's split) has the timestamp of
the item before it (Amazon 2014 times are days, and a day's items are in ASIN order: see ``gloss_cli.data``), the
others are ``later day``. Refused where timestamps are order indices (Toys), where no tie can be seen.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl

from gloss_cli.data import tie_policy
from gloss_cli.errors import GlossError
from gloss_cli.project import Project

COLD = 5
POWER = {"beauty": 14, "toys": 13, "sports": 13}
SEGMENTS = ("cold-start", "regular", "power")
TIE_SEGMENTS = ("same-day", "later day")
BY = ("interactions", "ties")


@dataclass
class SegmentReport:
    k: int
    cold: int | None  # None when split by ties
    power: int | None
    runs: list[str]
    table: pl.DataFrame  # run, segment, users, share, recall@k, ndcg@k
    plot: Path | None
    by: str = "interactions"
    caption: str = ""  # how the users were split, under each table


def eval_runs(project: Project, runs: list[str] | None) -> list[str]:
    stages = project.manifest()["stages"]
    available = [name.removeprefix("eval/") for name in stages if name.startswith("eval/")]
    if not available:
        raise GlossError(
            f"No eval runs in {project.root}.",
            "Run 'gloss eval' first (recipe gloss; --recipe 'lis-paper users=all' needs no model).",
        )
    for run in runs or []:
        if run not in available:
            raise GlossError(f"No eval run '{run}'.", f"Available: {', '.join(available)}.")
    return list(runs) if runs else available


def interaction_segments(counts: pl.DataFrame, cold: int, power: int) -> pl.DataFrame:
    """user_id, segment: cold-start / regular / power by ``n_dedup``."""
    segment = (
        pl.when(pl.col("n_dedup") <= cold)
        .then(pl.lit("cold-start"))
        .when(pl.col("n_dedup") > power)
        .then(pl.lit("power"))
        .otherwise(pl.lit("regular"))
    )
    return counts.select("user_id", segment=segment)


def tie_segments(sequences: pl.DataFrame, split: str) -> pl.DataFrame:
    """user_id, segment: same-day / later day, by whether the ``split`` target has the previous item's timestamp."""
    back = 2 if split == "validation" else 1  # the validation target is the second-to-last item
    n, ts = pl.col("n"), pl.col("timestamps")
    same = ts.list.get(n - back) == ts.list.get(n - back - 1)
    return sequences.select("user_id", segment=pl.when(same).then(pl.lit("same-day")).otherwise(pl.lit("later day")))


def segment_table(
    per_user: dict[str, pl.DataFrame], labels: dict[str, pl.DataFrame], k: int, segments: tuple[str, ...]
) -> pl.DataFrame:
    """Per run and segment (``labels[run]``: user_id, segment), the users and their mean recall and ndcg at ``k``."""
    frames = []
    for run, frame in per_user.items():
        if f"recall@{k}" not in frame.columns:
            raise GlossError(f"Eval run '{run}' has no metrics at K={k}.", f"Re-run it with -k {k}, or pass -k.")
        joined = frame.join(labels[run], on="user_id", how="left")
        if joined.get_column("segment").null_count():
            raise GlossError(f"Eval run '{run}' has users that are not in this project's data.", "Re-run 'gloss eval'.")
        stats = joined.group_by("segment").agg(
            users=pl.len(), recall=pl.col(f"recall@{k}").mean(), ndcg=pl.col(f"ndcg@{k}").mean()
        )
        # every segment appears, an empty one with 0 users and no metric values
        frames.append(
            pl.DataFrame({"segment": list(segments)})
            .join(stats, on="segment", how="left")
            .with_columns(pl.col("users").fill_null(0).cast(pl.UInt32))
            .with_columns(run=pl.lit(run), share=pl.col("users") / pl.col("users").sum())
        )
    order = {name: i for i, name in enumerate(segments)}
    return (
        pl.concat(frames)
        .rename({"recall": f"recall@{k}", "ndcg": f"ndcg@{k}"})
        .with_columns(order=pl.col("segment").replace_strict(order, return_dtype=pl.Int32))
        .sort("run", "order")
        .select("run", "segment", "users", "share", f"recall@{k}", f"ndcg@{k}")
    )


def plot(table: pl.DataFrame, k: int, path: Path, title: str) -> None:
    """Bars of recall and ndcg per segment (in the table's order), one colour per run."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt
    import numpy as np

    runs = table.get_column("run").unique(maintain_order=True).to_list()
    segments = table.filter(pl.col("run") == runs[0]).get_column("segment").to_list()
    columns = min(len(runs), 4)
    legend_rows = -(-len(runs) // columns)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4 + 0.25 * legend_rows))
    width = 0.8 / len(runs)
    for ax, metric in zip(axes, (f"recall@{k}", f"ndcg@{k}"), strict=True):
        for i, run in enumerate(runs):
            rows = table.filter(pl.col("run") == run)
            ax.bar(
                np.arange(len(segments)) + i * width, rows.get_column(metric).fill_null(0).to_list(), width, label=run
            )
        labels = [
            f"{s}\n({n:,} users)"
            for s, n in zip(segments, table.filter(pl.col("run") == runs[0]).get_column("users"), strict=True)
        ]
        ax.set_xticks(np.arange(len(segments)) + width * (len(runs) - 1) / 2, labels)
        ax.set_title(metric)
        ax.grid(axis="y", alpha=0.3)
    # below the plots, where it hides no bar whatever the number of runs
    handles, names = axes[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=columns, fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.06 * legend_rows / (1 + 0.06 * legend_rows) + 0.02, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


@dataclass
class Split:
    """How users are split: each run's user_id -> segment, the segments in order, and the words for it."""

    labels: dict[str, pl.DataFrame]
    segments: tuple[str, ...]
    params: dict[str, Any]
    title: str
    caption: str


def run(
    project: Project,
    *,
    runs: list[str] | None = None,
    k: int = 5,
    by: str = "interactions",
    cold: int | None = None,
    power: int | None = None,
    command: str = "gloss segments",
) -> SegmentReport:
    data = project.require("data")
    dataset = data["params"]["dataset"]
    if by not in BY:
        raise GlossError(f"Unknown --by '{by}'.", f"Use one of: {', '.join(BY)}.")
    if by == "ties" and (cold is not None or power is not None):
        raise GlossError("--cold and --power split users by interactions, not by ties.", "Drop them, or drop --by.")
    cold = COLD if cold is None else cold
    power = POWER.get(dataset, 13) if power is None else power
    if by == "interactions" and not 0 < cold < power:
        raise GlossError(f"Need 0 < --cold ({cold}) < --power ({power}).", "E.g. --cold 5 --power 14.")
    names = eval_runs(project, runs)
    for name in names:  # their files as the eval stages wrote them (a deleted or edited per_user file is refused)
        project.require(f"eval/{name}")
    split = by_ties(project, data, names, k) if by == "ties" else by_interactions(project, names, k, cold, power)
    per_user = {name: pl.read_parquet(project.path(f"eval/{name}/per_user.parquet")) for name in names}
    table = segment_table(per_user, split.labels, k, split.segments)
    params = {"runs": names, "k": k, **split.params, "by": by}
    upstream = ("data", *(f"eval/{name}" for name in names))
    with project.run_stage("segments", params, command=command, upstream=upstream, libraries=("matplotlib",)) as stage:
        table.write_parquet(stage.dir / "segments.parquet")
        (stage.dir / "segments.json").write_text(json.dumps(table.to_dicts(), indent=2) + "\n", encoding="utf-8")
        plot(table, k, stage.dir / "segments.png", f"{dataset}: {split.title}, K={k}")
        stage.metrics = {"segments": table.to_dicts()}
    path = project.path("segments/segments.png")
    if by == "ties":
        return SegmentReport(k, None, None, names, table, path, by=by, caption=split.caption)
    return SegmentReport(k, cold, power, names, table, path, by=by, caption=split.caption)


def by_interactions(project: Project, names: list[str], k: int, cold: int, power: int) -> Split:
    counts = pl.read_parquet(project.path("data/sequences.parquet"), columns=["user_id", "n_dedup"])
    return Split(
        dict.fromkeys(names, interaction_segments(counts, cold, power)),
        SEGMENTS,
        {"cold": cold, "power": power, "count": "interactions, exact duplicates removed"},
        f"users by interactions (cold-start <= {cold} < regular <= {power} < power)",
        f"cold-start <= {cold} < regular <= {power} < power (interactions, duplicates removed); metrics @ {k}, mean "
        "over the segment's users",
    )


def by_ties(project: Project, data: dict[str, Any], names: list[str], k: int) -> Split:
    policy = tie_policy(data)
    return Split(
        tie_labels(project, data, names),
        TIE_SEGMENTS,
        {"same_day": "the target has the previous item's timestamp"},
        f"users by whether the target shares the previous item's day; {policy}",
        f"same-day: the run's target (its split's held-out item) has the previous item's timestamp, later day: a "
        f"later one; {policy}; metrics @ {k}, mean over the segment's users",
    )


def tie_labels(project: Project, data: dict[str, Any], names: list[str]) -> dict[str, pl.DataFrame]:
    """Per eval run, its users' tie segments for the run's split; refused where ties cannot be measured."""
    sequences = pl.read_parquet(project.path("data/sequences.parquet"), columns=["user_id", "timestamps", "n"])
    measured = data.get("metrics", {}).get("ties")
    if measured is None:  # data made before ties were measured: any tie at all shows there are days to compare
        tied = sequences.select(pl.col("timestamps").list.eval(pl.element().diff() == 0).list.any().any()).item()
        measured = {"measurable": bool(tied), "why": "no two neighbouring items of any user share a timestamp"}
    if not measured["measurable"]:
        raise GlossError(
            f"Cannot split {data['params']['dataset']} users by same-day ties: {measured['why']}.",
            "Use --by interactions (the default).",
        )
    splits = {name: project.require(f"eval/{name}")["params"].get("split", "test") for name in names}
    by_split = {split: tie_segments(sequences, split) for split in set(splits.values())}
    return {name: by_split[splits[name]] for name in names}


def as_json(report: SegmentReport) -> dict[str, Any]:
    return {
        "k": report.k,
        "by": report.by,
        "cold": report.cold,
        "power": report.power,
        "runs": report.runs,
        "segments": report.table.to_dicts(),
        "plot": str(report.plot),
    }
