"""The exact command line of the running gloss command, rebuilt from the click context, for the manifest (every
stage records how to redo it) and ``gloss status``."""

from __future__ import annotations

import contextlib
import importlib
import shlex
from typing import Any

# Options that change what is printed, not what a stage writes; --project is where the record lives (the redo
# command gets it from Project.with_project).
_NOT_RECORDED = frozenset({"project", "json_", "quiet"})


def _click_context() -> Any:
    """The command-line context of the running command, or None. Recent Typer runs on its own copy of click,
    whose context stack is not click's."""
    for module in ("typer._click.globals", "click.globals"):
        with contextlib.suppress(ImportError):
            return importlib.import_module(module).get_current_context(silent=True)
    return None


def _given_params(ctx: Any) -> list[Any]:
    """The command's parameters given on the command line or through an environment variable (not defaults)."""
    return [
        p
        for p in ctx.command.params
        if p.name
        and (source := ctx.get_parameter_source(p.name)) is not None
        and source.name in ("COMMANDLINE", "ENVIRONMENT")
    ]


def given() -> set[str]:
    """The running command's given parameters by name (see _given_params); empty outside a command."""
    ctx = _click_context()
    return set() if ctx is None else {p.name for p in _given_params(ctx)}


def invocation() -> tuple[str, str] | None:
    """The running gloss command's name and its command line, rebuilt from the click context (None outside one).

    Every option given on the command line or through an environment variable, by its first long name, shell-quoted;
    defaults are left out, as they were not typed.
    """
    ctx = _click_context()
    if ctx is None or not ctx.info_name:
        return None
    words = ["gloss", ctx.info_name]
    for param in _given_params(ctx):
        if param.name not in _NOT_RECORDED:
            words += _option_words(param, ctx.params[param.name])
    return ctx.info_name, shlex.join(words)


def _option_words(param: Any, value: Any) -> list[str]:
    """``param`` (a click Parameter) with ``value`` as command-line words."""
    values = (value or []) if param.multiple else [value]
    if param.param_type_name != "option":
        return [str(v) for v in values]  # an argument: positional

    def long(names: list[str]) -> str:
        return next((n for n in names if n.startswith("--")), names[0])

    if param.is_flag:
        if value:
            return [long(param.opts)]
        return [long(param.secondary_opts)] if param.secondary_opts else []
    return [word for v in values if v is not None for word in (long(param.opts), str(getattr(v, "value", v)))]
