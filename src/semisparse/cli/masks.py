"""`semisparse apply-mask` and `semisparse export-mask`: mask files in the public MaskLLM format."""

from __future__ import annotations

from typing import Any

import click

from semisparse.cli.common import dtype_option, threads_option, user_errors
from semisparse.jobs.masks import apply_mask_to_dir, export_mask_file


@click.command("apply-mask")
@click.argument("model")
@click.argument("masks")
@click.option("-o", "--output", "out", required=True, help="Output directory (must not exist).")
@click.option("--pattern", default="2:4", show_default=True, help="N:M pattern the masks must follow.")
@click.option("--include", multiple=True, help="Only layers matching this glob get masks (repeatable).")
@click.option("--exclude", multiple=True, help="Layers matching this glob get no mask (repeatable).")
@click.option(
    "--at-most",
    is_flag=True,
    help="Accept masks keeping N or fewer of every M (default: exactly N; fewer is refused).",
)
@dtype_option
@click.option("--overwrite", is_flag=True, help="Replace the output directory if it exists.")
@threads_option
@user_errors
def apply_mask_command(model: str, masks: str, out: str, **kw: Any) -> None:
    """Apply the mask file MASKS (.npz, `<param>.mask` keys) to the dense MODEL and save it to -o.

    Each mask must keep exactly N of every M weights of --pattern; --at-most also accepts fewer (a group,
    or a whole layer, may then be all zeros).
    """
    meta = apply_mask_to_dir(model, masks, out, **kw)
    click.echo(
        f"saved {out}: {meta['pattern']} masks on {len(meta['targets'])} layers, "
        f"{meta['overall_sparsity']:.2%} zeros"
    )


@click.command("export-mask")
@click.argument("model")
@click.option("-o", "--output", "out", required=True, help="Mask file to write, e.g. masks.npz.")
@click.option(
    "--pattern", default=None, help="N:M pattern to verify (default: the model's saved one, else 2:4)."
)
@click.option("--include", multiple=True, help="Only export layers matching this glob (repeatable).")
@click.option("--exclude", multiple=True, help="Skip layers matching this glob (repeatable).")
@click.option("--overwrite", is_flag=True, help="Replace the file if it exists.")
@threads_option
@user_errors
def export_mask_command(
    model: str, out: str, include: tuple[str, ...], exclude: tuple[str, ...], **kw: Any
) -> None:
    """Write the masks of the N:M-sparse MODEL (read from its zeros) to a mask file."""
    info = export_mask_file(model, out, include=include or None, exclude=exclude or None, **kw)
    click.echo(f"saved {info['path']}: {info['pattern']} masks of {info['layers']} layers")
