"""`gloss recipes`: the named recipes and what each ranks."""

from __future__ import annotations

from gloss_cli.console import print_json
from gloss_cli.options import JsonOpt


def recipes(json_: JsonOpt = False) -> None:
    """List the recipe presets that --recipe takes (eval, recommend, rerank, run, experiments), each with its
    explicit form (key=value words, which --recipe also takes) and what it ranks."""
    from gloss_cli.recipe import DEFAULT, PRESETS

    if json_:
        print_json({name: recipe.as_dict() | {"description": recipe.describe()} for name, recipe in PRESETS.items()})
        return
    from rich.table import Table

    from gloss_cli.console import out

    table = Table(title="recipes (--recipe NAME, or key=value words after a name they modify)", title_justify="left")
    for column in ("name", "explicit form", "what it ranks"):
        table.add_column(column)
    for name, recipe in PRESETS.items():
        table.add_row(f"[bold]{name}[/]" if name == DEFAULT else name, recipe.explicit(), recipe.describe())
    out.print(table)
