"""Pieces every command shares: the user-error wrapper and common options.

A `SemisparseError` becomes one line on stderr and exit status 2; no traceback for user mistakes.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from functools import wraps
from typing import Any

import click

from semisparse import workflows
from semisparse.errors import SemisparseError


def user_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """Turn SemisparseError into a one-line message and a non-zero exit."""

    @wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except SemisparseError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("interrupted: nothing was written", err=True)
            sys.exit(130)

    return wrapper


device_option = click.option("--device", default=None, help="cuda, cuda:1, cpu (default: cuda if available).")
dtype_option = click.option(
    "--dtype", default="float32", type=click.Choice(list(workflows.DTYPES)), show_default=True
)
quiet_option = click.option("--quiet", is_flag=True, help="No progress bars.")
