"""`semisparse quantize`, `compress` and `decompress`: int8/int4 that keeps the zeros, and 2:4 checkpoints."""

from __future__ import annotations

from typing import Any

import click

from semisparse.cli.common import device_option, quiet_option, user_errors
from semisparse.quantization import QUANT_METHODS
from semisparse.quantization.jobs import compress_to_dir, decompress_to_dir, quantize_to_dir


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


@click.command("quantize")
@click.argument("model_dir")
@click.option("-o", "--output", "out", required=True, help="Output directory (must not exist).")
@click.option("--bits", type=click.Choice(["4", "8"]), default="4", show_default=True)
@click.option("--method", type=click.Choice(QUANT_METHODS), default="gptq", show_default=True)
@click.option("--group-size", type=int, default=128, show_default=True, help="Input columns per scale.")
@click.option("--per-channel", is_flag=True, help="One scale per output row instead of groups.")
@click.option("--symmetric", is_flag=True, help="Symmetric grid (no zero points; default asymmetric).")
@click.option(
    "--act-order/--no-act-order",
    default=True,
    show_default=True,
    help="GPTQ: quantize columns by decreasing activation energy (static groups).",
)
@click.option("--calibration", default="c4", show_default=True, help="GPTQ data: c4, wikipedia or a file.")
@click.option("--nsamples", type=int, default=128, show_default=True, help="GPTQ calibration windows.")
@click.option("--seqlen", type=int, default=2048, show_default=True, help="Tokens per calibration window.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--include", multiple=True, help="Only quantize layers matching this glob (repeatable).")
@click.option("--exclude", multiple=True, help="Never quantize layers matching this glob (repeatable).")
@click.option("--compressed", is_flag=True, help="Write the compressed 2:4 bitmask layout (packed codes).")
@device_option
@click.option("--overwrite", is_flag=True, help="Replace the output directory if it exists.")
@quiet_option
@user_errors
def quantize_command(
    model_dir: str, out: str, bits: str, group_size: int, per_channel: bool, quiet: bool, **kw: Any
) -> None:
    """Quantize the kept weights of MODEL_DIR (e.g. a 2:4 model) to int8/int4; zeros stay zero."""
    meta = quantize_to_dir(
        model_dir,
        out,
        bits=int(bits),
        group_size=None if per_channel else group_size,
        progress=not quiet,
        **kw,
    )
    ratios = meta["sizes"]["times_smaller"]
    click.echo(
        f"saved {out}: {meta['method']}, {len(meta['quantization']['layers'])} layers, "
        f"{_mib(meta['on_disk_bytes']['this'])} on disk (source {_mib(meta['on_disk_bytes']['source'])}); "
        f"targets {ratios['dense_fp32/values_only']:.1f}x smaller than fp32 counting values only, "
        f"{ratios['dense_fp32/values_grids_hw_metadata']:.1f}x with scales and 2:4 metadata"
    )


@click.command("compress")
@click.argument("model_dir")
@click.option("-o", "--output", "out", required=True, help="Output directory (must not exist).")
@click.option("--overwrite", is_flag=True, help="Replace the output directory if it exists.")
@user_errors
def compress_command(model_dir: str, out: str, overwrite: bool) -> None:
    """Store MODEL_DIR's 2:4 layers as kept values (or packed codes) plus a bitmask; lossless."""
    meta = compress_to_dir(model_dir, out, overwrite)
    sizes = meta["on_disk_bytes"]
    click.echo(f"saved {out}: {_mib(sizes['this'])} on disk, was {_mib(sizes['source'])}")


@click.command("decompress")
@click.argument("model_dir")
@click.option("-o", "--output", "out", required=True, help="Output directory (must not exist).")
@click.option("--overwrite", is_flag=True, help="Replace the output directory if it exists.")
@user_errors
def decompress_command(model_dir: str, out: str, overwrite: bool) -> None:
    """Write a compressed MODEL_DIR back as a plain transformers model directory (bit-exact weights)."""
    meta = decompress_to_dir(model_dir, out, overwrite)
    sizes = meta["on_disk_bytes"]
    click.echo(f"saved {out}: {_mib(sizes['this'])} on disk, was {_mib(sizes['source'])}")
