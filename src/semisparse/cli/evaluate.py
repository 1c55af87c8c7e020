"""`semisparse eval`: perplexity and zero-shot accuracy of one or more models, side by side."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from semisparse.cli.common import device_option, dtype_option, quiet_option, threads_option, user_errors
from semisparse.errors import SemisparseError
from semisparse.evaluation.comparison import format_table
from semisparse.evaluation.zeroshot import DEFAULT_SEED, TASKS
from semisparse.export import check_writable
from semisparse.jobs.evaluate import evaluate_models


@click.command("eval")
@click.argument("models", nargs=-1, required=True)
@click.option(
    "--ppl",
    default="wikitext2",
    show_default=True,
    help="wikitext2, c4-eval (the C4 shard's last 100 documents), a local text file, or none to skip.",
)
@click.option(
    "--tasks",
    default=None,
    help=(
        f"Zero-shot tasks through lm-evaluation-harness, comma-separated: all ({','.join(TASKS)}) "
        "or any harness task name (sciq, copa, social_iqa, ...; a tag stands for its tasks, groups such "
        "as mmlu are refused)."
    ),
)
@click.option("--limit", type=int, default=None, help="Only the first N examples of each task (quick look).")
@click.option("--seqlen", type=int, default=None, help="Window length (default: min(2048, context)).")
@click.option("--max-windows", type=int, default=None, help="Evaluate only the first K windows (quick look).")
@click.option("--batch-size", type=int, default=1, show_default=True, help="Windows / requests per forward.")
@click.option("--seed", type=int, default=DEFAULT_SEED, show_default=True, help="Harness random seed.")
@click.option("--report-dir", default=None, help="Write report.json, report.md and report.png here.")
@click.option("--overwrite", is_flag=True, help="Replace an existing --report-dir.")
@click.option("--output", "out", default=None, help="Also write the perplexity rows as JSON to this file.")
@device_option
@dtype_option
@quiet_option
@threads_option
@user_errors
def eval_command(models: tuple[str, ...], out: str | None, quiet: bool, **kw: Any) -> None:
    """Perplexity and zero-shot accuracy of MODELS, side by side (the first is the reference)."""
    if out:
        if Path(out).expanduser().is_dir():
            raise SemisparseError(f"{out} is a directory: pass a file name such as rows.json as `out`")
        check_writable(out)  # before hours of evaluation, not after
    report = evaluate_models(models, progress=not quiet, **kw)
    rows = [entry["perplexity"] for entry in report["models"] if entry.get("perplexity")]
    click.echo()
    if rows:
        first = rows[0]
        scope = "all" if first["windows"] == first["total_windows"] else f"first {first['windows']} of"
        click.echo(
            f"perplexity on {first['dataset']}, {scope} {first['total_windows']} windows of {first['seqlen']}"
        )
    settings = report["settings"]
    if settings["tasks"]:
        scope = f"first {settings['limit']} examples of each task" if settings["limit"] else "full sets"
        click.echo(f"zero-shot acc (%) through lm-evaluation-harness, {scope}, seed {settings['seed']}")
    click.echo(format_table(report))
    if (rows and rows[0]["windows"] < rows[0]["total_windows"]) or settings["limit"]:
        click.echo("(a quick slice: drop --max-windows / --limit for the standard full-test numbers)")
    if kw.get("report_dir"):
        click.echo(f"report written to {kw['report_dir']}")
    if out:
        with open(out, "w") as handle:
            json.dump(rows, handle, indent=2)
