"""`semisparse run RECIPE -o OUT`: a recipe's stages (prune, train, quantize, compress, eval) in order."""

from __future__ import annotations

import sys

import click

from semisparse.cli.common import quiet_option, threads_option, user_errors
from semisparse.jobs.recipe import Recipe


@click.command("run")
@click.argument("recipe")
@click.option("-o", "--output", "out", required=True, help="Output directory: one folder per stage.")
@click.option("--model", default=None, help="Base model (overrides the recipe's `model`).")
@click.option("--resume", is_flag=True, help="Continue an interrupted run in -o after its finished stages.")
@click.option("--overwrite", is_flag=True, help="Delete an earlier recipe run in -o and start over.")
@quiet_option
@threads_option
@user_errors
def run_command(recipe: str, out: str, model: str | None, resume: bool, overwrite: bool, quiet: bool) -> None:
    """Run the stages of the YAML file RECIPE into -o, with one provenance chain (OUT/semisparse.json).

    A recipe names an optional base model and a list of stages, e.g.

    \b
      model: smollm2-135m
      stages:
        - prune: {method: sparsegpt, pattern: "2:4"}
        - quantize: {method: gptq, bits: 4}
        - compress:
        - eval: {dataset: wikitext2, max_windows: 16}

    The whole recipe is checked before anything is written; `semisparse settings NAME` lists a stage's or
    a technique's settings.
    """
    parsed = Recipe.from_yaml(recipe)
    try:
        result = parsed.run(model, out=out, resume=resume, overwrite=overwrite, progress=not quiet)
    except KeyboardInterrupt:
        click.echo(f"interrupted: the finished stages in {out} are kept; continue with --resume", err=True)
        sys.exit(130)
    click.echo(result.summary())
