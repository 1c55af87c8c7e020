"""`semisparse` command line: a thin layer of flags over `semisparse.workflows`.

A `SemisparseError` becomes one line on stderr and exit status 2; no traceback for user mistakes.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from functools import wraps
from typing import Any

import click
from transformers.utils import logging as hf_logging

from semisparse import workflows
from semisparse.errors import SemisparseError
from semisparse.models import DEFAULT_MODEL
from semisparse.pruning import PRUNING_METHODS


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


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="semisparse")
def main() -> None:
    """Turn a Hugging Face causal LM into an accurate 2:4 (N:M) sparse model, and measure it."""
    hf_logging.disable_progress_bar()  # our own bars say what is happening; errors stay one line


@main.command("prune")
@click.argument("model", default=DEFAULT_MODEL)
@click.option("-o", "--output", "out", required=True, help="Output directory (must not exist).")
@click.option("--method", type=click.Choice(PRUNING_METHODS), default="sparsegpt", show_default=True)
@click.option("--pattern", default=None, help="N:M pattern, e.g. 2:4 (the default unless --sparsity).")
@click.option("--sparsity", type=float, default=None, help="Unstructured sparsity ratio instead of N:M.")
@click.option("--calibration", default="c4", show_default=True, help="c4, wikipedia or a local text file.")
@click.option("--nsamples", type=int, default=128, show_default=True, help="Calibration windows.")
@click.option("--seqlen", type=int, default=2048, show_default=True, help="Tokens per calibration window.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--include", multiple=True, help="Only prune layers matching this glob (repeatable).")
@click.option("--exclude", multiple=True, help="Never prune layers matching this glob (repeatable).")
@click.option("--blocksize", type=int, default=128, show_default=True, help="SparseGPT column block.")
@click.option("--percdamp", type=float, default=0.01, show_default=True, help="SparseGPT dampening.")
@device_option
@dtype_option
@click.option("--overwrite", is_flag=True, help="Replace the output directory if it exists.")
@quiet_option
@user_errors
def prune_command(
    model: str, out: str, pattern: str | None, sparsity: float | None, quiet: bool, **kw: Any
) -> None:
    """Prune MODEL (hub id, local dir, .gguf, or smollm2-135m) one-shot and save it to -o."""
    if pattern is None and sparsity is None:
        pattern = "2:4"
    meta = workflows.prune_to_dir(model, out, pattern=pattern, sparsity=sparsity, progress=not quiet, **kw)
    click.echo(
        f"saved {out}: {meta['method']} {meta['pattern'] or meta['sparsity']}, "
        f"{len(meta['targets'])} layers, {meta['overall_sparsity']:.2%} zeros, {meta['prune_seconds']:.1f} s"
    )


@main.command("info")
@click.argument("model")
@click.option("--pattern", default=None, help="Verify this N:M pattern (default: the saved one).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@user_errors
def info_command(model: str, pattern: str | None, as_json: bool) -> None:
    """Report the sparsity of MODEL's target layers and verify its N:M pattern."""
    report = workflows.inspect_model(model, pattern)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
    else:
        width = max((len(layer.name) for layer in report.layers), default=10)
        for layer in report.layers:
            verdict = {True: "ok", False: "VIOLATES", None: ""}[layer.follows_pattern]
            shape = f"{layer.shape[0]}x{layer.shape[1]}"
            click.echo(f"{layer.name:<{width}}  {shape:>11}  {layer.sparsity:7.2%}  {verdict}")
        click.echo(
            f"{len(report.layers)} target layers, {report.overall_sparsity:.2%} zeros overall"
            + (f", pattern {report.pattern}: {len(report.violations)} violations" if report.pattern else "")
        )
    if report.violations:
        sys.exit(1)


@main.command("eval")
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
