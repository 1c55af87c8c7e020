"""Learning-rate schedule: linear warm-up, then cosine decay to a fraction of the peak.

As in `../shared/METHODS.md` §2.6. The factor is a picklable callable object so `LambdaLR.state_dict()`
stores it with the checkpoint.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.optim.lr_scheduler import LambdaLR


@dataclass
class WarmupCosine:
    """lr(step) / peak for the optimizer step `step` (0-based) of `total_steps`.

    Warm-up: (step + 1) / warmup_steps, reaching the peak at the last warm-up step. Then cosine from 1 at
    step `warmup_steps` to `min_ratio` at the last step `total_steps - 1`.
    """

    total_steps: int
    warmup_steps: int
    min_ratio: float = 0.1

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        span = self.total_steps - 1 - self.warmup_steps
        progress = min(1.0, (step - self.warmup_steps) / span) if span > 0 else 1.0
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def make_scheduler(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int, min_ratio: float
) -> LambdaLR:
    """Scale every parameter group's own lr by the same factor, so methods may give groups different peaks."""
    return LambdaLR(optimizer, WarmupCosine(total_steps, warmup_steps, min_ratio))
