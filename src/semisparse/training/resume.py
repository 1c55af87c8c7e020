"""Continuing a run from a checkpoint (`checkpoint.py` writes and verifies them).

A checkpoint pins the run's inputs: the corpus (sha256 of the file, tokenizer, token count) and the base
model (sha256 of its weight files), and the config fields that decide the result; resuming on other
inputs or settings is refused. Resuming with another `lr`, `min_lr_ratio`, `warmup_steps` or `grad_clip`
needs `allow_schedule_change`: the checkpoint's step count then continues on the new schedule, and the
change is logged as an `event` row `{"event": "schedule_change", ...}` in metrics.jsonl and in the
provenance.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from semisparse.errors import SemisparseError
from semisparse.training import checkpoint, distributed
from semisparse.training.config import SCHEDULE_FIELDS, TrainConfig
from semisparse.training.method import TrainingMethod

_SCHEDULE = frozenset(f"config.{name}" for name in SCHEDULE_FIELDS)


def fingerprint_fields(config: TrainConfig, method: TrainingMethod, world_size: int) -> dict[str, Any]:
    """What a checkpoint records of its run and a resumed run must match (`checkpoint.check_compatible`)."""
    fields = {f"config.{k}": v for k, v in config.fingerprint_fields().items()}
    return {**fields, "method": method.name, "world_size": world_size}


@dataclass
class Restored:
    """The loop's progress as a checkpoint recorded it; `changes` is the new schedule, {field: [old, new]}."""

    path: Path
    step: int
    bad_steps: int
    skipped_steps: int
    wall_seconds: float
    schedule_changes: list[dict[str, Any]] = field(default_factory=list)
    changes: dict[str, list[Any]] = field(default_factory=dict)

    def event(self) -> dict[str, Any] | None:
        """The metrics row that logs a schedule change, if there was one."""
        if not self.changes:
            return None
        return {"kind": "event", "event": "schedule_change", "step": self.step, "changes": self.changes}


def restore_checkpoint(
    path: Path,
    *,
    model: torch.nn.Module,
    method: TrainingMethod,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LambdaLR,
    expected: dict[str, Any],
    inputs: dict[str, Any],
    rank: int,
    fsdp: bool,
    allow_schedule_change: bool,
) -> Restored:
    """Load checkpoint `path` into the model, optimizer, schedule, method and RNGs, after checking that it
    belongs to this run (`expected` fields, `inputs` pins).

    With `allow_schedule_change` and another schedule in the config than in the checkpoint, the schedule
    continues at the checkpoint's step with the config's peak lrs and warm-up/cosine shape.
    """
    meta = checkpoint.read_meta(path)
    changes = checkpoint.check_compatible(path, meta, expected, _SCHEDULE, allow_schedule_change)
    checkpoint.check_inputs(path, meta, inputs)
    state = checkpoint.load_state(path, meta)
    # The schedule this run's config asks for, before the checkpoint's replaces it.
    fresh_bases = list(scheduler.base_lrs)
    fresh_factors = [dict(vars(factor)) for factor in scheduler.lr_lambdas]
    try:
        distributed.load_full_state(model, optimizer, state["model"], state["optimizer"], fsdp)
        scheduler.load_state_dict(state["scheduler"])
        method.load_state_dict(state["method"])
        rngs = state["rng"]
        checkpoint.set_rng_state(rngs[rank] if rank < len(rngs) else rngs[0])
    except (RuntimeError, KeyError, ValueError, TypeError, IndexError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise SemisparseError(
            f"checkpoint {path} does not fit this model/method ({first[:120]}); start over with `overwrite`"
        ) from err
    restored = Restored(
        path=path,
        step=int(state["step"]),
        bad_steps=state["bad_steps"],
        skipped_steps=state["skipped_steps"],
        wall_seconds=state.get("wall_seconds", 0.0),
        schedule_changes=list(state.get("schedule_changes") or []),
    )
    if changes:
        _switch_schedule(scheduler, optimizer, fresh_bases, fresh_factors)
        restored.changes = {key.removeprefix("config."): value for key, value in changes.items()}
        restored.schedule_changes.append({"step": restored.step, "changes": restored.changes})
    return restored


def _switch_schedule(
    scheduler: torch.optim.lr_scheduler.LambdaLR,
    optimizer: torch.optim.Optimizer,
    bases: list[float],
    factors: list[dict[str, Any]],
) -> None:
    """Continue the restored step count on the new schedule: new peak lrs and warm-up/cosine shape."""
    for factor, values in zip(scheduler.lr_lambdas, factors, strict=True):
        vars(factor).update(values)
    scheduler.base_lrs = bases
    epoch = scheduler.last_epoch
    lrs = [base * factor(epoch) for base, factor in zip(bases, scheduler.lr_lambdas, strict=True)]
    for group, base, lr in zip(optimizer.param_groups, bases, lrs, strict=True):
        group["initial_lr"], group["lr"] = base, lr
    scheduler._last_lr = lrs
