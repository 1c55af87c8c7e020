"""`semisparse bench`: 2:4 vs dense speed, per layer and end to end, as JSON plus a Markdown table."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import click

from semisparse import bench, runtime
from semisparse.acceleration import BACKENDS
from semisparse.cli.common import device_option, threads_option, user_errors
from semisparse.errors import SemisparseError

_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "bfloat16": "bfloat16", "float16": "float16"}


def _token_list(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError as err:
        raise SemisparseError(
            f"--tokens '{text}' is not a comma-separated list of integers (e.g. 1,16,128)"
        ) from err


@click.command("bench")
@click.argument("model", required=False)
@click.option(
    "--shapes", "preset", type=click.Choice(list(bench.PRESETS)), default=None, help="Model shapes."
)
@click.option("--tokens", default=None, help="Token counts, e.g. 1,16,128,2048,8192 (the default).")
@click.option("--dtype", type=click.Choice(list(_DTYPES)), default="bf16", show_default=True)
@click.option("--backend", type=click.Choice(BACKENDS), default=None, help="Default: PyTorch's choice.")
@click.option(
    "--reduced", is_flag=True, help="Small shapes, few repeats: runs on CPU in seconds (no speed claim)."
)
@click.option("--e2e-layers", type=int, default=4, show_default=True, help="Decoder layers of the e2e model.")
@click.option("--prefill", type=int, default=2048, show_default=True, help="End-to-end prefill tokens.")
@click.option("--decode", type=int, default=64, show_default=True, help="End-to-end decoded tokens.")
@click.option("--no-e2e", is_flag=True, help="Per-layer matmuls only.")
@click.option("--repeats", type=int, default=20, show_default=True)
@click.option("--warmup", type=int, default=5, show_default=True)
@click.option("-o", "--output", "out", required=True, help="JSON file; the Markdown goes next to it (.md).")
@device_option
@threads_option
@user_errors
def bench_command(
    model: str | None, tokens: str | None, dtype: str, out: str, no_e2e: bool, **kw: Any
) -> None:
    """Time MODEL's (or --shapes') linears dense vs 2:4, and prefill/decode end to end."""
    if kw["repeats"] < 1 or kw["warmup"] < 0:
        raise SemisparseError("--repeats must be at least 1 and --warmup at least 0")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the fallback reason is printed below, once
        record = bench.run_bench(
            model,
            tokens=_token_list(tokens),
            dtype=runtime.parse_dtype(_DTYPES[dtype]),
            end_to_end_too=not no_e2e,
            **kw,
        )
    path = Path(out).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")
    path.with_suffix(".md").write_text(bench.markdown(record))
    click.echo(bench.markdown(record))
    click.echo(f"wrote {path} and {path.with_suffix('.md')}")
