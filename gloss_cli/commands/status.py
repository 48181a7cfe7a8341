"""`gloss status`."""

from __future__ import annotations

from gloss_cli.console import print_json
from gloss_cli.options import DEFAULT_PROJECT_PATH, JsonOpt, ProjectOpt, QuietOpt
from gloss_cli.project import Project


def status(project: ProjectOpt = DEFAULT_PROJECT_PATH, json_: JsonOpt = False, quiet: QuietOpt = False) -> None:
    """Show each stage of the project as done, stale or missing, and the next command to run.

    [dim]Example:[/]  gloss status -p runs/beauty
    """
    proj = Project(project)
    states = proj.status()
    pending = next((s for s in states if s.state != "done"), None)
    next_command = pending.command if pending else None
    if pending and str(proj.root) != str(DEFAULT_PROJECT_PATH.absolute()):
        next_command = f"{pending.command} --project {project}"
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
    from gloss_cli.render import status_table

    status_table(proj, states, next_command)
