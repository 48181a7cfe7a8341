"""Shell completion scripts for `gloss`, generated from the Typer app.

Regenerate the checked-in copies with ``python -m gloss_cli.completion`` (a test fails when they are stale).
Install one by sourcing it, e.g. ``source completions/gloss.bash`` or copying ``gloss.fish`` to
``~/.config/fish/completions/``.
"""

from __future__ import annotations

from pathlib import Path

SHELLS = {"bash": "gloss.bash", "zsh": "gloss.zsh", "fish": "gloss.fish"}


def script(shell: str) -> str:
    from typer._completion_shared import get_completion_script

    return get_completion_script(prog_name="gloss", complete_var="_GLOSS_COMPLETE", shell=shell).rstrip() + "\n"


def write_all(folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for shell, name in SHELLS.items():
        (folder / name).write_text(script(shell), encoding="utf-8")
        written.append(folder / name)
    return written


if __name__ == "__main__":
    for path in write_all(Path(__file__).resolve().parent.parent / "completions"):
        print(path)
