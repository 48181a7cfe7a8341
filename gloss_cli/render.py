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
    sample = "every user, the benchmark's" if "benchmark" in stats else "5 %, seed 42"
    if _cut(stats):
        sample = "first valid item"
    rows = [
        ("users (>= 3 interactions)", "users", "test_users"),
        ("items with a title", "items", "items"),
        ("interactions kept", "interactions", "interactions"),
        ("train examples", "train_examples", None),
        (f"validation users ({sample})", "validation_users", "validation_users"),
        ("test users (first test item)" if _cut(stats) else "test users (last item)", "test_users", "test_users"),
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
    if "time_unit" in stats:
        table.add_row("time unit", stats["time_unit"], "")
    for split, counts in stats.get("benchmark", {}).items():
        # timestamp variants: gloss takes a subset of the rows ("scored"), the rest are counted, not compared
        taken = counts.get("scored", counts["published"])
        mark = "[green]equal ✓[/]" if counts["equal"] == taken else "[yellow]differ ✗[/]"
        label = f"published {split} rows gloss equals" + (" (of those it scores)" if "scored" in counts else "")
        table.add_row(label, f"{counts['equal']:,} of {taken:,}", mark)
        if "later_rows" in counts:
            left = f"{counts['later_rows']:,} later + {counts['no_history']:,} without history"
            table.add_row(f"published {split} rows not scored", left, f"of {counts['published']:,}")
    for label, value, note in tie_rows(stats.get("ties", {})):
        table.add_row(label, value, note)
    out.print(table)


def _cut(stats: dict[str, Any]) -> bool:
    """Whether the splits come from cut-off times (a timestamp benchmark), not leave-one-out."""
    return "scored" in stats.get("benchmark", {}).get("test", {})


def tie_rows(ties: dict[str, Any]) -> list[tuple[str, str, str]]:
    """The data table's rows on same-day ties (none for stats written before they were measured)."""
    if not ties:
        return []
    policy = "file order" if ties["policy"] == "file" else f"shuffled (seed {ties['seed']})"
    rows = [("same-day ties", policy, "")]
    if not ties["measurable"]:
        return [*rows, ("same-day ties measured", "[yellow]no[/]: timestamps are order indices", "")]
    for label, key in (("test", "test_targets"), ("validation", "validation_targets")):
        t = ties[key]
        share = "" if t["share"] is None else f" ({t['share']:.1%})"
        rows.append((f"{label} targets on the previous item's day", f"{t['same_day']:,} of {t['users']:,}{share}", ""))
    pairs = ties["neighbour_pairs"]
    ordered = pairs["same_day"] - pairs["same_item"]
    share = "" if pairs["ascending_share"] is None else f" ({pairs['ascending_share']:.1%})"
    note = "[yellow]an id sort ✗[/]" if ties["id_sorted"] else ""
    rows.append(("same-day neighbours in ascending id order", f"{pairs['ascending_id']:,} of {ordered:,}{share}", note))
    return rows


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
            caption=report.caption,
            caption_justify="left",
        )
        for column in ("segment", "users", "share", f"recall@{k}", f"ndcg@{k}"):
            table.add_column(column, justify="left" if column == "segment" else "right")
        for r in rows.iter_rows(named=True):
            values = ["-" if r[m] is None else f"{r[m]:.4f}" for m in (f"recall@{k}", f"ndcg@{k}")]
            table.add_row(r["segment"], f"{r['users']:,}", f"{r['share']:.1%}", *values)
        out.print(table)
    out.print(f"plot: {report.plot}")


def recommendations(result: Any, *, profile: bool, recipe: Any, load: dict[str, float] | None = None) -> None:
    who = f"user {result.user_id}" if result.user_id else "the given history"
    shown = result.history[-5:]
    out.print(f"[bold]{who}[/] · {len(result.history)} items, latest last:")
    if len(result.history) > len(shown):
        out.print("  [dim]…[/]")
    for title in shown:
        out.print(f"  • {title}")
    table = Table(
        title=f"recommendations for {who}",
        title_justify="left",
        caption=f"{recipe.describe()}; query = the list that found the item first",
        caption_justify="left",
    )
    for column, justify in (
        ("rank", "right"),
        ("item", "left"),
        ("title", "left"),
        ("score", "right"),
        ("query", "left"),
    ):
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    for item in result.items:
        query = result.queries[item.query][0]
        table.add_row(str(item.rank), item.item_id, item.title, f"{item.score:.4f}", f"#{item.query + 1} {query}")
    out.print(table)
    if profile:
        t = result.timings
        out.print(
            f"[dim]time per user: prompt {t['prompt'] * 1000:.1f} ms · generation {t['generation']:.3f} s · "
            f"retrieval {t['retrieval'] * 1000:.1f} ms[/]"
        )
        if load:
            out.print("[dim]loading: " + " · ".join(f"{key} {value:.3f} s" for key, value in load.items()) + "[/]")


def run_summary(summary: Any) -> None:
    from gloss_cli.ranking import TIE_ORDER

    rows = summary.rows
    users = f"{rows[0]['users']:,} test users" if rows else "no users"
    table = Table(
        title=f"gloss run: the model's recipe against LIS and the no-model lists ({users})", title_justify="left"
    )
    for column in ("row", "lists", "recipe", "history", "recall@5", "ndcg@5", "mrr@5"):
        table.add_column(column, justify="right" if column in ("recall@5", "ndcg@5", "mrr@5") else "left")
    for i, r in enumerate(rows):
        table.add_row(
            r["key"],
            f"[bold]{r['label']}[/]" if i == 0 else r["label"],
            r["recipe"]["name"],
            "excluded" if r["exclude_seen"] else "kept",
            f"{r['recall@5']:.4f}",
            f"{r['ndcg@5']:.4f}",
            f"{r['mrr@5']:.4f}",
        )
    out.print(table)
    if summary.comparisons:
        paired = Table(title="paired over the same users (bootstrap 95 % CI, 1,000 resamples)", title_justify="left")
        for column in ("comparison", "recall@5: difference [95 % CI]", "ndcg@5: difference [95 % CI]"):
            paired.add_column(column)
        for c in summary.comparisons:
            cells = []
            for metric in ("recall@5", "ndcg@5"):
                d = c[metric]
                sign = "green" if d["lo"] > 0 else "red" if d["hi"] < 0 else "default"
                cells.append(f"[{sign}]{d['diff']:+.4f} [{d['lo']:+.4f}, {d['hi']:+.4f}][/] ({d['relative']:+.0%})")
            paired.add_row(f"{c['a']} - {c['b']}", *cells)
        out.print(paired)
    train = getattr(summary, "train", None) or {}
    if train.get("stopped") == "time-budget":
        out.print(
            f"[dim]training: {train['steps']:,} steps in its time budget at {train.get('tokens_per_s') or 0:,.0f} "
            f"tokens/s (validation loss {train.get('best_val_loss')}); it replays on any machine with gloss train "
            f"{train.get('replay')}.[/]"
        )
    out.print(
        f"[dim]test split, the same users for every row; mean over users, one held-out item each; K = 5; "
        f"{rows[0]['ties'] if rows else ''}; {TIE_ORDER}. Each row's recipe (gloss eval --recipe NAME; "
        "gloss recipes lists them): paper = the model's 5 queries, top-1 each, history kept (GLoSS); lis-paper = "
        "the top-5 of the last item's title; the others fuse their lists by list-weighted reciprocal rank, history "
        "excluded: lis = the last item's title, model = the 5 generated titles, transitions = the items that "
        "followed the user's 5 most recent items in the training sequences (no model), no-model = transitions + "
        "lis, gloss = transitions + lis + the model's first 2 queries. The first row is the declared recipe "
        "(docs/RESULTS.md, picked on validation); green: the CI is above 0, red: below. "
        f"Per-user results: eval/<run>/ ({', '.join(r['run'] for r in rows)}).[/]"
    )
    out.print(f"segments plot: {summary.plot}")
