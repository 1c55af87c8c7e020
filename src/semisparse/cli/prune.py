"""`semisparse prune` and `semisparse info`: one-shot pruning and the sparsity report."""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from semisparse import registry
from semisparse.cli.common import (
    SETTINGS_KEY,
    device_option,
    dtype_option,
    quiet_option,
    threads_option,
    user_errors,
)
from semisparse.jobs.base import run_stage
from semisparse.jobs.prune import inspect_model
from semisparse.models import DEFAULT_MODEL
from semisparse.settings import describe, parse_assignments


@click.command("prune")
@click.argument("model", default=DEFAULT_MODEL)
@click.option("-o", "--output", "out", required=True, help="Output directory (must not exist).")
@click.option(
    "--method",
    default="sparsegpt",
    show_default=True,
    help="A registered pruner: magnitude, wanda, sparsegpt (`semisparse settings pruner` lists them).",
)
@click.option("--pattern", default=None, help="N:M pattern, e.g. 2:4 (the default unless --sparsity).")
@click.option("--sparsity", type=float, default=None, help="Unstructured sparsity ratio instead of N:M.")
@click.option(
    "--calibration", "source", default="c4", show_default=True, help="c4, wikipedia or a local text file."
)
@click.option("--nsamples", type=int, default=128, show_default=True, help="Calibration windows.")
@click.option("--seqlen", type=int, default=2048, show_default=True, help="Tokens per calibration window.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--include", multiple=True, help="Only prune layers matching this glob (repeatable).")
@click.option("--exclude", multiple=True, help="Never prune layers matching this glob (repeatable).")
@click.option("--blocksize", type=int, default=None, help="SparseGPT column block (default 128).")
@click.option("--percdamp", type=float, default=None, help="SparseGPT dampening (default 0.01).")
@click.option(
    "--set", "assignments", multiple=True, metavar="KEY=VALUE", help="One pruner setting (repeatable)."
)
@device_option
@dtype_option
@click.option("--overwrite", is_flag=True, help="Replace the output directory if it exists.")
@quiet_option
@threads_option
@user_errors
def prune_command(
    model: str,
    out: str,
    method: str,
    pattern: str | None,
    sparsity: float | None,
    source: str,
    nsamples: int,
    seqlen: int,
    seed: int,
    blocksize: int | None,
    percdamp: float | None,
    assignments: tuple[str, ...],
    quiet: bool,
    **kw: Any,
) -> None:
    """Prune MODEL (hub id, local dir, .gguf, smollm2-135m or gemma3-270m) one-shot and save it to -o."""
    entry = registry.lookup("pruner", method)
    click.get_current_context().meta[SETTINGS_KEY] = [row.name for row in describe(entry.config)]
    given = {"pattern": pattern, "sparsity": sparsity, "blocksize": blocksize, "percdamp": percdamp}
    values = {key: value for key, value in given.items() if value is not None}
    settings = {**values, **parse_assignments(assignments)}
    entry.config.from_mapping(settings)  # a mistake in --set lists the pruner's own settings
    overwrite = kw.pop("overwrite")
    calibration = {"source": source, "nsamples": nsamples, "seqlen": seqlen, "seed": seed}
    layers = {"include": list(kw.pop("include")), "exclude": list(kw.pop("exclude"))}
    stage = registry.lookup("stage", "prune")  # the same stage a recipe runs, with -o as its directory
    config = stage.config.from_mapping({"method": method, **settings, **calibration, **layers, **kw})
    meta = run_stage("prune", config, model, out, overwrite=overwrite, progress=not quiet)
    click.echo(
        f"saved {out}: {meta['method']} {meta['pattern'] or meta['sparsity']}, "
        f"{len(meta['targets'])} layers, {meta['overall_sparsity']:.2%} zeros, {meta['prune_seconds']:.1f} s"
    )


@click.command("info")
@click.argument("model")
@click.option("--pattern", default=None, help="Verify this N:M pattern (default: the saved one).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@threads_option
@user_errors
def info_command(model: str, pattern: str | None, as_json: bool) -> None:
    """Report the sparsity of MODEL's target layers and verify its N:M pattern.

    \b
    Per layer, against the pattern N:M:
      ok              every group of M keeps exactly N non-zeros
      ok (at most N)  no group has more than N, some fewer (zero-valued kept weights, e.g. after
                      quantization, or groups pruned further, down to a whole layer of zeros)
      VIOLATES        some group has more than N non-zeros (exit status 1)
    """
    report = inspect_model(model, pattern)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
    else:
        width = max((len(layer.name) for layer in report.layers), default=10)
        n = report.pattern.split(":")[0] if report.pattern else ""
        for layer in report.layers:
            verdict = {True: "ok", False: "VIOLATES", None: ""}[layer.follows_pattern]
            if layer.follows_pattern and layer.exact is False:
                verdict = f"ok (at most {n})"
            shape = f"{layer.shape[0]}x{layer.shape[1]}"
            click.echo(f"{layer.name:<{width}}  {shape:>11}  {layer.sparsity:7.2%}  {verdict}")
        click.echo(
            f"{len(report.layers)} target layers, {report.overall_sparsity:.2%} zeros overall"
            + (f", pattern {report.pattern}: {len(report.violations)} violations" if report.pattern else "")
            + (f", {len(report.at_most)} at most {n} (fewer kept in some group)" if report.at_most else "")
        )
    if report.violations:
        sys.exit(1)
