"""What the benchmark scripts share: where results go, how the device is named, running the CLI."""

from __future__ import annotations

import platform
import subprocess
import sys
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


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
