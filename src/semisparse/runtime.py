"""Where and how a job runs: dtype names, the default device, mixed precision, and measuring a job's time
and memory.

A leaf of the package (torch, stdlib and `semisparse.errors` only), shared by the jobs and the training
loop below them.
"""

from __future__ import annotations

import os
import resource
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext, suppress
from dataclasses import dataclass, field
from typing import Any

import torch

from semisparse.errors import SemisparseError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise SemisparseError(f"unknown dtype '{name}': use one of {', '.join(DTYPES)}")
    return DTYPES[name]


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def autocast(mode: str, device: torch.device) -> AbstractContextManager[Any]:
    """bf16 autocast for `mode` "bf16", or "auto" on CUDA; float32 otherwise ("off", or "auto" on a CPU).

    Master weights, optimizer state and anything outside the context stay float32; only the matrix
    products and attention run in bfloat16 (on CPUs with AMX they are several times faster too, which
    "bf16" makes available where a run's numbers may differ from float32 ones).
    """
    if mode not in ("auto", "bf16", "off"):
        raise SemisparseError(f"unknown autocast mode '{mode}': use auto, bf16 or off")
    if mode == "bf16" or (mode == "auto" and device.type == "cuda"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def set_threads(threads: int) -> None:
    """Use `threads` CPU threads for PyTorch's intra-op work (and inter-op pool, where still settable).

    On a machine shared with other busy processes, fewer threads than cores avoids threads waiting on each
    other's descheduled peers (a 2-core machine with one other job: `threads`=1).
    """
    if threads < 1:
        raise SemisparseError(f"`threads` must be at least 1, got {threads}")
    torch.set_num_threads(threads)
    # settable only once, before any inter-op work started; the intra-op count is what matters
    with suppress(RuntimeError):
        torch.set_num_interop_threads(threads)


def load_average() -> list[float] | None:
    """The 1, 5 and 15 minute load averages (runnable processes), or None where the OS has none."""
    try:
        return [round(value, 2) for value in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def machine_state() -> dict[str, Any]:
    """What decides CPU timings besides the code: threads used, CPUs present, how busy the machine is."""
    return {"threads": torch.get_num_threads(), "cpus": os.cpu_count(), "load_average": load_average()}


@dataclass
class Measurement:
    seconds: float = 0.0
    peak_memory_bytes: dict[str, int] = field(default_factory=dict)


@contextmanager
def measured(device: str) -> Iterator[Measurement]:
    """Wall time and peak memory (process RSS; CUDA allocator peak on GPU) of the enclosed work."""
    result = Measurement()
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    yield result
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        result.peak_memory_bytes["cuda_allocated"] = torch.cuda.max_memory_allocated()
    result.seconds = time.perf_counter() - start
    result.peak_memory_bytes["process_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
