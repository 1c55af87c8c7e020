"""`semisparse eval`: perplexity of one or more models side by side."""

from __future__ import annotations

import json
from typing import Any

import click

from semisparse import workflows
from semisparse.cli.common import device_option, dtype_option, quiet_option, user_errors


@click.command("eval")
@click.argument("models", nargs=-1, required=True)
@click.option(
    "--ppl", "dataset", default="wikitext2", show_default=True, help="wikitext2 or a local text file."
)
@click.option("--seqlen", type=int, default=None, help="Window length (default: min(2048, context)).")
@click.option("--max-windows", type=int, default=None, help="Evaluate only the first K windows (quick look).")
@click.option("--batch-size", type=int, default=1, show_default=True, help="Windows per forward pass.")
@click.option("--output", "out", default=None, help="Also write the rows as JSON to this file.")
@device_option
@dtype_option
@quiet_option
@user_errors
def eval_command(models: tuple[str, ...], out: str | None, quiet: bool, **kw: Any) -> None:
    """Perplexity of one or more MODELS on the same text, side by side (the first is the reference)."""
    rows = workflows.evaluate_perplexity(models, progress=not quiet, **kw)
    reference = rows[0]["perplexity"]
    first = rows[0]
    scope = "all" if first["windows"] == first["total_windows"] else f"first {first['windows']} of"
    click.echo(
        f"\nperplexity on {first['dataset']}, {scope} {first['total_windows']} windows of {first['seqlen']}"
    )
    click.echo(f"{'model':<40} {'method':<10} {'pattern':<8} {'ppl':>10} {'x first':>8}")
    for row in rows:
        click.echo(
            f"{row['model']:<40} {row['method']:<10} {row['pattern'] or '-':<8} "
            f"{row['perplexity']:>10.2f} {row['perplexity'] / reference:>8.2f}"
        )
    if first["windows"] < first["total_windows"]:
        click.echo("(a quick slice: drop --max-windows for the standard full-test number)")
    if out:
        with open(out, "w") as handle:
            json.dump(rows, handle, indent=2)
