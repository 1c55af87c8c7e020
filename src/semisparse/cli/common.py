"""Pieces every command shares: the user-error wrapper and common options.

A `SemisparseError` becomes one line on stderr and exit status 2; no traceback for user mistakes. The
library names parameters in backquotes (`` `seqlen` ``); here they become the command's own flags
(`--seqlen`), or `--set name=...` for a method setting, so each audience reads the name it types.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from functools import wraps
from typing import Any

import click

from semisparse.errors import SemisparseError
from semisparse.runtime import DTYPES, set_threads

_PARAMETER = re.compile(r"`([A-Za-z_][A-Za-z0-9_]*)`(=?)")
# The names of method settings a command takes through `--set`, stored by the command before it runs.
SETTINGS_KEY = "semisparse.settings"


def cli_message(message: str, context: click.Context | None) -> str:
    """A library message with each backquoted parameter replaced by the flag that sets it here."""
    if context is None:
        return message
    flags = {
        param.name: max(param.opts, key=len)
        for param in context.command.params
        if isinstance(param, click.Option) and param.name
    }
    settings = context.meta.get(SETTINGS_KEY, ())

    def replace(match: re.Match[str]) -> str:
        name, assigned = match.groups()
        if name in flags:
            return flags[name] + assigned
        if name in settings:
            return f"--set {name}=" + ("" if assigned else "...")
        return match.group(0)

    return _PARAMETER.sub(replace, message)


def user_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """Turn SemisparseError into a one-line message naming this command's flags, and exit status 2."""

    @wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except SemisparseError as exc:
            click.echo(f"error: {cli_message(str(exc), click.get_current_context(silent=True))}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("interrupted: nothing was written", err=True)
            sys.exit(130)

    return wrapper


device_option = click.option("--device", default=None, help="cuda, cuda:1, cpu (default: cuda if available).")
dtype_option = click.option("--dtype", default="float32", type=click.Choice(list(DTYPES)), show_default=True)
quiet_option = click.option("--quiet", is_flag=True, help="No progress bars.")


def _apply_threads(context: click.Context, _param: click.Parameter, threads: int | None) -> None:
    """Set the thread count while the command line is parsed, before the command does any work."""
    if threads is None:
        return
    try:
        set_threads(threads)
    except SemisparseError as exc:
        click.echo(f"error: {cli_message(str(exc), context)}", err=True)
        context.exit(2)


threads_option = click.option(
    "--threads",
    type=int,
    default=None,
    expose_value=False,
    callback=_apply_threads,
    help="CPU threads for PyTorch (default: PyTorch's choice). On a machine shared with other busy jobs, "
    "give each job fewer threads than cores, e.g. --threads 1 on 2 cores.",
)


def add_threads_option(command: click.Command) -> None:
    """Give a command `--threads` unless it declares it (the subcommands of a group declare their own)."""
    if not isinstance(command, click.Group) and not any(param.name == "threads" for param in command.params):
        threads_option(command)
