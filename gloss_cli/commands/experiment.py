"""`gloss experiment run` and `gloss experiment summary`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from gloss_cli.console import RichReporter, print_json
from gloss_cli.options import JsonOpt, QuietOpt

app = typer.Typer(help="Experiments from spec files: pick a recipe on validation, then test it (docs/RESULTS.md).")
SUMMARY_START, SUMMARY_END = "<!-- experiments -->", "<!-- /experiments -->"


@app.command("run")
def run(
    spec: Annotated[Path, typer.Argument(help="The experiment's spec (TOML): see gloss_cli/experiment.py.")],
    project: Annotated[
        Path | None,
        typer.Option("--project", "-p", help="The experiment's project folder (default: gloss-experiments/<name>)."),
    ] = None,
    json_: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Run an experiment: the missing stages, every candidate on validation, the pick recorded, then the pick and
    the baselines on test with paired CIs; writes report.json and report.md into the project folder.

    [dim]Example:[/]

      gloss experiment run experiments/main-job-beauty.toml
    """
    from gloss_cli.experiment import load_spec
    from gloss_cli.experiment import run as run_experiment
    from gloss_cli.project import Project

    loaded = load_spec(spec)
    reporter = RichReporter(quiet)
    proj = Project(project or Path("gloss-experiments") / loaded.name)
    with proj.lock(f"gloss experiment run {spec}", reporter):
        report = run_experiment(proj, loaded, reporter=reporter)
    if json_:
        print_json(report.as_dict())
        return
    from gloss_cli.console import out

    out.print((report.folder / "report.md").read_text(encoding="utf-8"))


@app.command("summary")
def summary(
    folders: Annotated[list[Path], typer.Argument(help="Experiment project folders (each with report.json).")],
    into: Annotated[
        Path | None,
        typer.Option(help=f"Replace the block between {SUMMARY_START} and {SUMMARY_END} in this Markdown file."),
    ] = None,
    pages: Annotated[Path | None, typer.Option(help="Also copy each report.md here as <experiment>.md.")] = None,
) -> None:
    """One table over experiments: each pick's test row, its baselines and the paired differences."""
    import json

    from gloss_cli.console import out
    from gloss_cli.errors import GlossError

    reports = []
    for folder in folders:
        path = folder / "report.json"
        try:
            reports.append((folder, json.loads(path.read_text(encoding="utf-8"))))
        except (OSError, ValueError) as exc:
            raise GlossError(f"Cannot read {path} ({exc}).", "Run gloss experiment run SPEC first.") from None
    lines = [
        "| experiment | dataset | pick (on validation) | test users | pick: Recall@K / NDCG@K | baseline: Recall@K / "
        "NDCG@K | pick - baseline, Recall@K [95 % CI] | pick - baseline, NDCG@K [95 % CI] |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for _, r in reports:
        k, pick = r["k"], r["pick"]
        p = r["test"][pick]
        for i, c in enumerate(r["comparisons"] or [None]):
            picked = f"{pick} (`{r['candidates'][pick]}`)" if i == 0 else pick  # the recipe once per experiment
            if c is None:
                lines.append(
                    f"| {r['experiment']} | {r['dataset']} | {pick} | {p['users']:,} | "
                    f"{p[f'recall@{k}']:.4f} / {p[f'ndcg@{k}']:.4f} | — | — | — |"
                )
                continue
            b = r["test"][c["b"]]
            diffs = [
                f"{c[m]['diff']:+.4f} [{c[m]['lo']:+.4f}, {c[m]['hi']:+.4f}]" for m in (f"recall@{k}", f"ndcg@{k}")
            ]
            lines.append(
                f"| {r['experiment']} | {r['dataset']} | {picked} | {p['users']:,} | "
                f"{p[f'recall@{k}']:.4f} / {p[f'ndcg@{k}']:.4f} | {c['b']}: {b[f'recall@{k}']:.4f} / "
                f"{b[f'ndcg@{k}']:.4f} | {diffs[0]} | {diffs[1]} |"
            )
    table = "\n".join(lines) + "\n"
    if pages is not None:
        pages.mkdir(parents=True, exist_ok=True)
        for folder, r in reports:
            (pages / f"{r['experiment']}.md").write_text((folder / "report.md").read_text(encoding="utf-8"))
    if into is None:
        out.print(table)
        return
    text = into.read_text(encoding="utf-8")
    if SUMMARY_START not in text or SUMMARY_END not in text:
        raise GlossError(
            f"{into} has no {SUMMARY_START} … {SUMMARY_END} block.", "Add the two markers where the table goes."
        )
    head, rest = text.split(SUMMARY_START, 1)
    _, tail = rest.split(SUMMARY_END, 1)
    into.write_text(f"{head}{SUMMARY_START}\n{table}{SUMMARY_END}{tail}", encoding="utf-8")
    out.print(f"wrote the summary of {len(reports)} experiment(s) into {into}")
