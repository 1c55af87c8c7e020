"""`semisparse` command line: a thin layer of flags over the Python API, one module per command family."""

from __future__ import annotations

import click
from transformers.utils import logging as hf_logging

from semisparse.cli.bench import bench_command
from semisparse.cli.common import add_threads_option
from semisparse.cli.evaluate import eval_command
from semisparse.cli.masks import apply_mask_command, export_mask_command
from semisparse.cli.prune import info_command, prune_command
from semisparse.cli.quantize import compress_command, decompress_command, quantize_command
from semisparse.cli.reconstruct import reconstruct_command
from semisparse.cli.run import run_command
from semisparse.cli.settings import settings_command
from semisparse.cli.train import train


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="semisparse")
def main() -> None:
    """Turn a Hugging Face causal LM into an accurate 2:4 (N:M) sparse model, and measure it."""
    hf_logging.disable_progress_bar()  # our own bars say what is happening; errors stay one line


main.add_command(prune_command)
main.add_command(reconstruct_command)
main.add_command(info_command)
main.add_command(eval_command)
main.add_command(quantize_command)
main.add_command(compress_command)
main.add_command(decompress_command)
main.add_command(apply_mask_command)
main.add_command(export_mask_command)
main.add_command(train)
main.add_command(bench_command)
main.add_command(settings_command)
main.add_command(run_command)

for _command in main.commands.values():  # every command takes --threads, including any added without it
    add_threads_option(_command)
