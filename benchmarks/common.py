"""What the benchmark scripts share: where results go, how the device is named, running the CLI."""

from __future__ import annotations

import json
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def write_results(json_path: Path, record: dict[str, Any], markdown: str) -> Path:
    """Write a run's record as JSON and its Markdown table next to it (same stem); returns the .md path."""
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(record, indent=2) + "\n")
    markdown_path = json_path.with_suffix(".md")
    markdown_path.write_text(markdown)
    return markdown_path


def window_scope(row: dict[str, Any]) -> str:
    """How much of the perplexity test a row covers, e.g. "all 148" or "first 16 of 148"."""
    scope = "all" if row["windows"] == row["total_windows"] else f"first {row['windows']} of"
    return f"{scope} {row['total_windows']}"


def semisparse_command(*args: str) -> list[str]:
    """The command line that runs `semisparse ARGS` with this interpreter."""
    return [sys.executable, "-m", "semisparse", *args]


def semisparse(*args: str) -> None:
    """Run `semisparse ARGS` in its own process (its own peak memory), failing on a non-zero exit."""
    subprocess.run(semisparse_command(*args), check=True)


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
