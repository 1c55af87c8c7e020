"""`semisparse reconstruct`: block-wise reconstruction of a pruned model against the dense one."""

from __future__ import annotations

import sys
from typing import Any

import click

from semisparse import registry
from semisparse.cli.common import SETTINGS_KEY, device_option, quiet_option, user_errors
from semisparse.jobs.base import run_stage
from semisparse.settings import describe, parse_assignments


@click.command("reconstruct")
@click.argument("model")
@click.argument("pruned")
@click.option("-o", "--output", "out", required=True, help="Output directory (must not exist).")
@click.option(
    "--granularity",
    default=None,
    help="attn-mlp (default: attention, then MLP, each against the dense sub-block), block, or linear.",
)
@click.option("--inputs", default=None, help="sparse (default: from the reconstructed blocks) or dense.")
@click.option("--epochs", type=int, default=None, help="Passes over the calibration windows (default 4).")
@click.option("--batch-size", type=int, default=None, help="Windows per optimizer step (default 1).")
@click.option("--lr", type=float, default=None, help="Peak AdamW lr of the kept weights (default 3e-3).")
@click.option(
    "--autocast",
    default=None,
    help="auto (default: bf16 on CUDA, float32 on CPU), bf16 (fast on CPUs with AMX) or off.",
)
@click.option("--learn-mask", is_flag=True, default=None, help="Also learn each block's N:M masks locally.")
@click.option("--pattern", default=None, help="N:M pattern (default: the pruned model's own, else 2:4).")
@click.option(
    "--calibration", "source", default="c4", show_default=True, help="c4, wikipedia or a local text file."
)
@click.option("--nsamples", type=int, default=128, show_default=True, help="Calibration windows.")
@click.option("--seqlen", type=int, default=2048, show_default=True, help="Tokens per calibration window.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--include", multiple=True, help="Only layers matching this glob (repeatable).")
@click.option("--exclude", multiple=True, help="Never layers matching this glob (repeatable).")
@click.option(
    "--set",
    "assignments",
    multiple=True,
    metavar="KEY=VALUE",
    help="Any other setting (repeatable); `semisparse settings reconstruct` lists them.",
)
@device_option
@click.option("--resume", is_flag=True, help="Continue an interrupted run into -o at its next block.")
@click.option("--overwrite", is_flag=True, help="Replace the output directory (and an interrupted run's).")
@quiet_option
@user_errors
def reconstruct_command(
    model: str,
    pruned: str,
    out: str,
    assignments: tuple[str, ...],
    resume: bool,
    overwrite: bool,
    quiet: bool,
    **flags: Any,
) -> None:
    """Reconstruct PRUNED block by block against the dense MODEL and save it to -o.

    PRUNED is a pruned model directory, a pruner name (magnitude, wanda, sparsegpt: MODEL is pruned
    first, on the same calibration windows) or a .npz mask file applied to MODEL. The kept weights of each
    block train (mask fixed, pruned weights stay zero) to match the dense block's outputs.
    """
    entry = registry.lookup("stage", "reconstruct")
    click.get_current_context().meta[SETTINGS_KEY] = [row.name for row in describe(entry.config)]
    values = {key: value for key, value in flags.items() if value is not None}
    values["include"], values["exclude"] = list(flags["include"]), list(flags["exclude"])
    config = entry.config.from_mapping({**values, **parse_assignments(assignments), "pruned": pruned})
    try:
        meta = run_stage(
            "reconstruct", config, model, out, overwrite=overwrite, resume=resume, progress=not quiet
        )
    except KeyboardInterrupt:
        from semisparse.jobs.reconstruct import work_dir

        click.echo(
            f"interrupted: the finished blocks are kept in {work_dir(out)}; rerun with --resume to continue",
            err=True,
        )
        sys.exit(130)
    settings = meta["settings"]
    text = (
        f"saved {out}: {settings['granularity']} reconstruction of {meta['start']['method']} "
        f"{meta['pattern']}, {len(meta['blocks'])} blocks, block output loss "
        f"{meta['block_loss_before']:.4g} -> {meta['block_loss_after']:.4g}"
    )
    if meta.get("mask_changed") is not None:
        text += f", mask changed {meta['mask_changed']:.2%}"
    click.echo(text + f", {meta['reconstruct_seconds']:.1f} s")
    from semisparse.jobs.reconstruct import run_hint  # off start-up, like work_dir above

    hint = run_hint(meta)
    if hint:
        click.echo(hint, err=True)
