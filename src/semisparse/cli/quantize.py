"""`semisparse quantize`, `compress` and `decompress`: int8/int4 that keeps the zeros, and 2:4 checkpoints."""

from __future__ import annotations

from typing import Any

import click

from semisparse import registry
from semisparse.cli.common import SETTINGS_KEY, device_option, quiet_option, threads_option, user_errors
from semisparse.jobs.base import run_stage
from semisparse.jobs.quantize import decompress_to_dir
from semisparse.settings import describe, parse_assignments


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


@click.command("quantize")
@click.argument("model_dir")
@click.option("-o", "--output", "out", required=True, help="Output directory (must not exist).")
@click.option("--bits", type=click.Choice(["4", "8"]), default="4", show_default=True)
@click.option("--method", default="gptq", show_default=True, help="A registered quantizer: rtn, gptq.")
@click.option("--group-size", type=int, default=128, show_default=True, help="Input columns per scale.")
@click.option("--per-channel", is_flag=True, help="One scale per output row instead of groups.")
@click.option("--symmetric", is_flag=True, help="Symmetric grid (no zero points; default asymmetric).")
@click.option(
    "--act-order/--no-act-order",
    default=None,
    help="GPTQ: quantize columns by decreasing activation energy (static groups; default on).",
)
@click.option(
    "--calibration", "source", default="c4", show_default=True, help="GPTQ data: c4, wikipedia or a file."
)
@click.option("--nsamples", type=int, default=128, show_default=True, help="GPTQ calibration windows.")
@click.option("--seqlen", type=int, default=2048, show_default=True, help="Tokens per calibration window.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--include", multiple=True, help="Only quantize layers matching this glob (repeatable).")
@click.option("--exclude", multiple=True, help="Never quantize layers matching this glob (repeatable).")
@click.option(
    "--set", "assignments", multiple=True, metavar="KEY=VALUE", help="One quantizer setting (repeatable)."
)
@click.option("--compressed", is_flag=True, help="Write the compressed 2:4 bitmask layout (packed codes).")
@device_option
@click.option("--overwrite", is_flag=True, help="Replace the output directory if it exists.")
@quiet_option
@threads_option
@user_errors
def quantize_command(
    model_dir: str,
    out: str,
    method: str,
    bits: str,
    group_size: int,
    per_channel: bool,
    symmetric: bool,
    act_order: bool | None,
    source: str,
    nsamples: int,
    seqlen: int,
    seed: int,
    assignments: tuple[str, ...],
    quiet: bool,
    **kw: Any,
) -> None:
    """Quantize the kept weights of MODEL_DIR (e.g. a 2:4 model) to int8/int4; zeros stay zero."""
    entry = registry.lookup("quantizer", method)
    click.get_current_context().meta[SETTINGS_KEY] = [row.name for row in describe(entry.config)]
    values: dict[str, Any] = {"bits": bits, "group_size": None if per_channel else group_size}
    values["symmetric"] = symmetric
    if act_order is not None:
        values["act_order"] = act_order
    settings = {**values, **parse_assignments(assignments)}
    entry.config.from_mapping(settings)  # a mistake in --set lists the quantizer's own settings
    overwrite = kw.pop("overwrite")
    calibration = {"source": source, "nsamples": nsamples, "seqlen": seqlen, "seed": seed}
    layers = {"include": list(kw.pop("include")), "exclude": list(kw.pop("exclude"))}
    stage = registry.lookup("stage", "quantize")  # the same stage a recipe runs, with -o as its directory
    config = stage.config.from_mapping({"method": method, **settings, **calibration, **layers, **kw})
    meta = run_stage("quantize", config, model_dir, out, overwrite=overwrite, progress=not quiet)
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
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["semisparse", "compressed-tensors"]),
    default="semisparse",
    show_default=True,
    help="semisparse: ours (also int4/int8 codes, GPT-2); compressed-tensors: that library's "
    "sparse-24-bitmask (unquantized; loads with compressed-tensors 0.14.0.1 + transformers 4.57).",
)
@click.option("--overwrite", is_flag=True, help="Replace the output directory if it exists.")
@threads_option
@user_errors
def compress_command(model_dir: str, out: str, fmt: str, overwrite: bool) -> None:
    """Store MODEL_DIR's 2:4 layers as kept values (or packed codes) plus a bitmask; lossless."""
    # the recipe's compress stage, -o its directory
    config = registry.lookup("stage", "compress").config.from_mapping({"format": fmt})
    meta = run_stage("compress", config, model_dir, out, overwrite=overwrite)
    sizes = meta["on_disk_bytes"]
    click.echo(f"saved {out}: {_mib(sizes['this'])} on disk, was {_mib(sizes['source'])}")


@click.command("decompress")
@click.argument("model_dir")
@click.option("-o", "--output", "out", required=True, help="Output directory (must not exist).")
@click.option("--overwrite", is_flag=True, help="Replace the output directory if it exists.")
@threads_option
@user_errors
def decompress_command(model_dir: str, out: str, overwrite: bool) -> None:
    """Write a compressed MODEL_DIR back as a plain transformers model directory (bit-exact weights)."""
    meta = decompress_to_dir(model_dir, out, overwrite)
    sizes = meta["on_disk_bytes"]
    click.echo(f"saved {out}: {_mib(sizes['this'])} on disk, was {_mib(sizes['source'])}")
