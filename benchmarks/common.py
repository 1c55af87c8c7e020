"""What the benchmark scripts share: where results go, how the device is named, running the CLI."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from semisparse.runtime import load_average, machine_state

RESULTS = Path(__file__).resolve().parent / "results"
# How busy the machine was when the script started (this module is imported first thing).
START_LOAD = load_average()


def machine_record() -> dict[str, Any]:
    """Threads, CPUs and the load average at the start and end of the run: CPU timings need them."""
    state = machine_state()
    return {
        "threads": state["threads"],
        "cpus": state["cpus"],
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "load_average_start": START_LOAD,
        "load_average_end": state["load_average"],
    }


def machine_line(machine: dict[str, Any]) -> str:
    """One Markdown line saying on how many threads, and on how busy a machine, the numbers were taken."""

    def load(values: list[float] | None) -> str:
        return "unknown" if values is None else " / ".join(f"{v:.2f}" for v in values)

    return (
        f"Machine: {machine['threads']} PyTorch threads on {machine['cpus']} CPUs; load average "
        f"(1 / 5 / 15 min) {load(machine['load_average_start'])} at the start, "
        f"{load(machine['load_average_end'])} at the end "
        "(a load above the CPU count means other processes competed for the cores)."
    )


def write_results(json_path: Path, record: dict[str, Any], markdown: str) -> Path:
    """Write a run's record as JSON and its Markdown table next to it (same stem); returns the .md path.

    The record gets a `machine` entry (threads, CPUs, load average) unless it has one, and the Markdown a
    line saying the same.
    """
    record = {**record, "machine": record.get("machine") or machine_record()}
    markdown = markdown.rstrip("\n") + "\n\n" + machine_line(record["machine"]) + "\n"
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
