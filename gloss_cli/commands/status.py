"""`gloss status`."""

from __future__ import annotations

from gloss_cli.console import print_json
from gloss_cli.options import DEFAULT_PROJECT_PATH, JsonOpt, ProjectOpt, QuietOpt
from gloss_cli.project import Project, StageState

_STATE_STYLE = {"done": "green", "stale": "yellow", "modified": "magenta", "missing": "red"}


def status(project: ProjectOpt = DEFAULT_PROJECT_PATH, json_: JsonOpt = False, quiet: QuietOpt = False) -> None:
    """Show each stage of the project as done, stale, modified or missing, and the next command to run.

    stale: an upstream stage was re-run or changed, or a source file changed. modified: the stage's own files changed
    on disk since it wrote them (stages that read them refuse to). The next command is the one that made the stage.

    [dim]Example:[/]  gloss status -p runs/beauty
    """
    proj = Project(project)
    states = proj.status()
    pending = next((s for s in states if s.state != "done"), None)
    next_command = proj.with_project(pending.command) if pending else None
    if json_:
        print_json(
            {
                "project": str(proj.root),
                "exists": proj.exists(),
                "stages": [s.__dict__ for s in states],
                "next": next_command,
            }
        )
        return
    _table(proj, states, next_command)


def _table(project: Project, states: list[StageState], next_command: str | None) -> None:
    from rich.markup import escape
    from rich.table import Table

    from gloss_cli.console import out

    table = Table(title=f"gloss project {project.root}", title_justify="left")
    for column in ("stage", "state", "finished", "note"):
        table.add_column(column)
    for s in states:
        table.add_row(s.name, f"[{_STATE_STYLE[s.state]}]{s.state}[/]", s.finished or "", s.reason)
    out.print(table)
    if next_command:
        out.print(f"next: [bold]{escape(next_command)}[/]", highlight=False)
    else:
        out.print("[green]all stages are done.[/]")
