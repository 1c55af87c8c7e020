"""Where and how a job runs: dtype names, the default device, and measuring a job's time and memory.

A leaf of the package (torch, stdlib and `semisparse.errors` only), shared by the jobs and the training
loop below them.
"""

from __future__ import annotations

import resource
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from semisparse.errors import SemisparseError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise SemisparseError(f"unknown dtype '{name}': use one of {', '.join(DTYPES)}")
    return DTYPES[name]


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


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
