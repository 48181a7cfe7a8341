"""Tables for stdout. Imported by the CLI only after a stage has run."""

from __future__ import annotations

from typing import Any

from rich.table import Table

from gloss_cli.console import out
from gloss_cli.project import Project, StageState
from gloss_cli.sources import DatasetInfo

_STATE_STYLE = {"done": "green", "stale": "yellow", "missing": "red"}


def data_table(info: DatasetInfo, stats: dict[str, Any]) -> None:
    table = Table(title=f"gloss data: {info.name}", title_justify="left")
    table.add_column("")
    table.add_column("value", justify="right")
    table.add_column("canonical 5-core", justify="right")
    rows = [
        ("users (>= 3 interactions)", "users", "test_users"),
        ("items with a title", "items", "items"),
        ("interactions kept", "interactions", "interactions"),
        ("train examples", "train_examples", None),
        ("validation users (5 %, seed 42)", "validation_users", "validation_users"),
        ("test users (last item)", "test_users", "test_users"),
    ]
    for label, key, canon in rows:
        want = info.canonical.get(canon) if canon else None
        mark = "" if want is None else (f"[green]{want:,} ✓[/]" if want == stats[key] else f"[yellow]{want:,} ✗[/]")
        table.add_row(label, f"{stats[key]:,}", mark)
    table.add_row(
        "sequence length",
        f"{stats['seq_len_mean']:.2f} ± {stats['seq_len_std']:.2f} (max {stats['seq_len_max']})",
        "",
    )
    out.print(table)


def status_table(project: Project, states: list[StageState], next_command: str | None) -> None:
    table = Table(title=f"gloss project {project.root}", title_justify="left")
    for column in ("stage", "state", "finished", "note"):
        table.add_column(column)
    for s in states:
        style = _STATE_STYLE[s.state]
        table.add_row(s.name, f"[{style}]{s.state}[/]", s.finished or "", s.reason)
    out.print(table)
    if next_command:
        out.print(f"next: [bold]{next_command}[/]")
    else:
        out.print("[green]all stages are done.[/]")


def eval_table(result: Any) -> None:
    table = Table(
        title=f"gloss eval: {result.name}", title_justify="left", caption=result.describe(), caption_justify="left"
    )
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_column("95% CI", justify="right")
    for metric, value in result.metrics.items():
        lo_hi = result.ci.get(metric)
        table.add_row(metric, f"{value:.4f}", f"[{lo_hi[0]:.4f}, {lo_hi[1]:.4f}]" if lo_hi else "")
    out.print(table)
    for note in result.notes:
        out.print(f"[yellow]note:[/] {note}")
    out.print(f"[dim]per-user metrics, TREC run and qrels: {result.folder}[/]")


def segments_table(report: Any) -> None:
    k = report.k
    for run in report.runs:
        rows = report.table.filter(report.table["run"] == run)
        table = Table(
            title=f"gloss segments: {run}",
            title_justify="left",
            caption=f"cold-start <= {report.cold} < regular <= {report.power} < power (interactions, duplicates "
            f"removed); metrics @ {k}, mean over the segment's users",
            caption_justify="left",
        )
        for column in ("segment", "users", "share", f"recall@{k}", f"ndcg@{k}"):
            table.add_column(column, justify="left" if column == "segment" else "right")
        for r in rows.iter_rows(named=True):
            table.add_row(
                r["segment"], f"{r['users']:,}", f"{r['share']:.1%}", f"{r[f'recall@{k}']:.4f}", f"{r[f'ndcg@{k}']:.4f}"
            )
        out.print(table)
    out.print(f"plot: {report.plot}")
