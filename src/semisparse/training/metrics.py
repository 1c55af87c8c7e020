"""The run's metrics: one JSON object per line in `metrics.jsonl`, optionally mirrored to TensorBoard.

Rows have a `kind`: `train` (one per optimizer step), `skip` (a step dropped for a non-finite loss),
`eval`, or `event` (something that changed the run, e.g. `{"event": "schedule_change", ...}` when a resumed
run continues with another learning rate). On resume the rows written after the checkpoint's step are
dropped first, so the log of a resumed run reads exactly like the log of an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import resource
from pathlib import Path
from typing import Any

import torch

from semisparse.errors import SemisparseError

METRICS_FILE = "metrics.jsonl"


def memory_bytes(device: torch.device) -> int:
    """Peak memory so far: the CUDA allocator's peak on GPU, else the process's peak RSS."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _clean(value: Any) -> Any:
    """JSON has no NaN/inf: write them as strings so the line stays valid JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class MetricsLog:
    """Appends rows on the writing rank; a no-op elsewhere."""

    def __init__(
        self,
        run_dir: Path,
        enabled: bool,
        tensorboard: bool,
        resume_step: int | None,
        rerun_eval: bool = False,
    ) -> None:
        """`rerun_eval`: the evaluation at `resume_step` runs again, so its logged row is dropped too."""
        self.path = run_dir / METRICS_FILE
        self.enabled = enabled
        self.writer = None
        if not enabled:
            return
        if resume_step is not None and self.path.is_file():
            kept = [
                line
                for line in self.path.read_text().splitlines()
                if _row_step(line) < resume_step
                or (_row_step(line) == resume_step and not (rerun_eval and _row_kind(line) == "eval"))
            ]
            self.path.write_text("".join(f"{line}\n" for line in kept))
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as err:
                raise SemisparseError("`tensorboard` needs tensorboard; pip install tensorboard") from err
            self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=resume_step)

    def write(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        try:
            with open(self.path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps({k: _clean(v) for k, v in row.items()}, default=str) + "\n")
        except OSError as err:
            raise SemisparseError(
                f"cannot append to {self.path} ({err.strerror or type(err).__name__}); make the run "
                "directory writable or free disk space, then continue with `resume`"
            ) from err
        if self.writer is not None:
            for key, value in row.items():
                if key not in ("step", "kind") and isinstance(value, int | float) and math.isfinite(value):
                    self.writer.add_scalar(f"{row['kind']}/{key}", value, row["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _row_step(line: str) -> float:
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return math.inf


def _row_kind(line: str) -> str | None:
    try:
        return json.loads(line).get("kind")
    except (json.JSONDecodeError, AttributeError):
        return None
