"""The shared training loop: a `TrainingMethod` supplies the model, loss and hooks; the loop does the rest.

Optimizer step `s` (0-based) consumes global sequences s·G .. s·G+G-1 (G = micro_batch · grad_accum ·
world_size) of the corpus order; rank r takes its contiguous slice of them, split into `grad_accum`
micro-batches. Per step the loop calls `before_step`, then `loss` and backward per micro-batch (loss
divided by `grad_accum`), averages gradients over ranks, clips, and, if the loss and gradient norm are
finite, steps the optimizer and calls `after_step`. A non-finite step is skipped (gradients dropped, no
`after_step`) but still advances the step, data position and LR schedule, so the budget stays exact.

Checkpoints are written every `checkpoint_every` steps, on SIGINT/SIGTERM and after the last step (before
the final evaluation and export, so a failed export loses no training; resuming that checkpoint only
evaluates and exports). What a resumed run must match, and how it may change its schedule: `resume`.

Inputs (config, corpus, evaluation text, model) are loaded before the output directory is touched; its
layout, and how `overwrite` replaces an old run only at the new run's first checkpoint: `rundir`.
"""

from __future__ import annotations

import contextlib
import functools
import math
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from semisparse.data import window_bos
from semisparse.errors import SemisparseError
from semisparse.models import load_tokenizer
from semisparse.modules import context_length
from semisparse.runtime import autocast
from semisparse.training import checkpoint, distributed
from semisparse.training.config import TrainConfig
from semisparse.training.corpus import PackedSequences
from semisparse.training.final_model import unsharded_method, write_model
from semisparse.training.inputs import evaluate, load_eval_ids, load_inputs
from semisparse.training.method import TrainingMethod, default_optimizer
from semisparse.training.metrics import METRICS_FILE, MetricsLog, memory_bytes
from semisparse.training.resume import fingerprint_fields, restore_checkpoint
from semisparse.training.rundir import CONFIG_FILE, MODEL_DIR, RunDirectory, check_output
from semisparse.training.schedule import make_scheduler
from semisparse.training.signals import StopRequests

__all__ = ["MethodFactory", "TrainingInterrupted", "TrainingMethod", "default_optimizer", "launch", "run"]

# (total_steps, device, initialise) -> the method; see `TrainingMethod.from_pretrained`.
MethodFactory = Callable[[int, str, bool], TrainingMethod]


class TrainingInterrupted(SemisparseError):
    """SIGINT/SIGTERM: the current step finished and a checkpoint was written; or a second signal aborted
    the run, and the message names the last checkpoint there is."""


def launch(
    config: TrainConfig,
    make_method: MethodFactory,
    *,
    resume: str | Path | None = None,
    overwrite: bool = False,
    progress: bool = True,
    allow_schedule_change: bool = False,
) -> Path:
    """Join torchrun's process group, build the method on this rank's device, train; returns OUT/model.

    `make_method(total_steps, device, initialise)` builds the method; `initialise` is False when a
    checkpoint will overwrite its state anyway (so slow initial pruning is skipped).
    """
    info, device = distributed.setup(config.device)
    try:
        config.check_world(info.world_size)
        check_output(config, resume, overwrite)
        total = config.total_steps(info.world_size)
        method = make_method(total, str(device), resume is None)

        def rebuild() -> TrainingMethod:
            return make_method(total, "cpu", False)

        trainer = _Trainer(config, method, info, progress, rebuild)
        return trainer.train(resume, overwrite, allow_schedule_change)
    finally:
        distributed.teardown(info)


def run(
    config: TrainConfig,
    method: TrainingMethod,
    *,
    resume: str | Path | None = None,
    overwrite: bool = False,
    progress: bool = True,
    allow_schedule_change: bool = False,
) -> Path:
    """Train `method` as `config` says and export the final model; returns the model directory OUT/model.

    `resume`: `"latest"` (this run's newest checkpoint), a run directory or a checkpoint directory.
    `overwrite`: replace an existing run in OUT, once the new one has written its first checkpoint.
    `allow_schedule_change`: on resume, accept another `lr`, `min_lr_ratio`, `warmup_steps` or `grad_clip`
    than the checkpoint's (logged as a `schedule_change` event). Raises `TrainingInterrupted` after
    checkpointing on SIGINT/SIGTERM (and on a second signal, naming the last checkpoint).
    """
    info, _ = distributed.setup(config.device)
    try:
        config.check_world(info.world_size)
        trainer = _Trainer(config, method, info, progress, None)
        return trainer.train(resume, overwrite, allow_schedule_change)
    finally:
        distributed.teardown(info)


class _Trainer:
    def __init__(
        self,
        config: TrainConfig,
        method: TrainingMethod,
        info: distributed.Distributed,
        progress: bool,
        rebuild: Callable[[], TrainingMethod] | None,
    ) -> None:
        self.config = config
        self.method = method
        self.model = method.model
        self.info = info
        self.progress = progress and info.is_main
        self.out = Path(config.output).expanduser()
        self.device = next(self.model.parameters()).device
        self.total = config.total_steps(info.world_size)
        self.global_batch = config.sequences_per_step(info.world_size)
        self.tokens_per_step = config.tokens_per_step(info.world_size)
        self.rebuild = rebuild
        if config.fsdp and rebuild is None:
            raise SemisparseError("`fsdp` needs the method factory: start the run with launch() or train()")
        self.tokenizer = method.tokenizer if method.tokenizer is not None else load_tokenizer(config.model)
        # What `train` sets up, in this order: the data, the optimizer and its schedule, the metrics log.
        # What the run is trained on is pinned in every checkpoint (`inputs`).
        self.corpus_info: dict[str, Any] = {}
        self.sequences: PackedSequences | None = None
        self.inputs: dict[str, Any] = {}
        self.eval_source: dict[str, Any] | None = None
        self.eval_ids: torch.Tensor | None = None
        self.eval_bos: int | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler: torch.optim.lr_scheduler.LRScheduler | None = None
        self.params: list[torch.Tensor] = []
        self.metrics: MetricsLog | None = None
        # The run's progress, restored from a checkpoint when resuming.
        self.started = time.perf_counter()
        self.wall_before = 0.0
        self.bad_steps = 0
        self.skipped_steps = 0
        self.last_checkpoint: Path | None = None
        self.saved_step: int | None = None
        self.step_done = 0
        self.schedule_changes: list[dict[str, Any]] = []
        # Where this run writes: OUT, or (main rank, `overwrite`) a sibling that replaces OUT at the first
        # checkpoint.
        self.rundir = RunDirectory(self.out)

    # --- evaluation and checkpoints ------------------------------------------------------------------
    def _evaluate(self, step: int) -> dict[str, Any] | None:
        if self.eval_ids is None:
            return None
        with self._autocast():
            tokens = step * self.tokens_per_step
            row = evaluate(self.model, self.eval_ids, self.config, step, tokens, self.eval_bos)
        self.metrics.write(row)
        return row

    def _save(self, step: int) -> Path | None:
        finite = all(torch.isfinite(distributed.local(p)).all() for p in self.model.parameters())
        if distributed.any_rank(not finite, self.info, self.device):
            raise SemisparseError(
                f"the weights are not finite at step {step}, not saving them; {self._lower_lr_advice()}"
            )
        model_state, optim_state = distributed.full_state(self.model, self.optimizer, self.config.fsdp)
        rng = distributed.gather_objects(checkpoint.rng_state(), self.info)
        method_state = self.method.state_dict()
        self.saved_step = step
        if not self.info.is_main:
            return None
        state = {
            "model": model_state,
            "optimizer": optim_state,
            "scheduler": self.scheduler.state_dict(),
            "method": method_state,
            "step": step,
            "data_position": step * self.global_batch,
            "rng": rng,
            "bad_steps": self.bad_steps,
            "skipped_steps": self.skipped_steps,
            "wall_seconds": self._wall(),
            "schedule_changes": self.schedule_changes,
        }
        meta = {
            "fields": fingerprint_fields(self.config, self.method, self.info.world_size),
            "fingerprint": self.config.fingerprint(),
            "inputs": self.inputs,
            "total_steps": self.total,
            "data_position": step * self.global_batch,
            "tokens_seen": step * self.tokens_per_step,
        }
        keep = self.config.keep_checkpoints
        self.last_checkpoint = checkpoint.save_checkpoint(self.rundir.path, step, state, meta, keep)
        if self.rundir.staging is not None:
            self._promote()
        return self.last_checkpoint

    def _promote(self) -> None:
        """Main rank, at the first checkpoint of an `overwrite` run: the new run replaces the old one."""
        staging = self.rundir.promote()
        if self.metrics is not None:
            self.metrics.path = self.out / METRICS_FILE
        if self.last_checkpoint is not None:
            self.last_checkpoint = self.out / self.last_checkpoint.relative_to(staging)

    def _lower_lr_advice(self) -> str:
        """What to do about a divergence: continue from the last good checkpoint with a lower lr."""
        if self.last_checkpoint is None:
            return "no checkpoint yet: start over (`overwrite`) with a lower `lr`"
        return (
            f"last good checkpoint: {self.last_checkpoint}; continue from it with `resume`, a lower `lr` and "
            "`allow_schedule_change`"
        )

    def _restore(self, path: Path, allow_schedule_change: bool) -> tuple[int, dict[str, Any] | None]:
        """Load checkpoint `path` into the model, optimizer, schedule, method and RNGs; returns its step
        and, when the schedule changed (`allow_schedule_change`), the event to log."""
        restored = restore_checkpoint(
            path,
            model=self.model,
            method=self.method,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            expected=fingerprint_fields(self.config, self.method, self.info.world_size),
            inputs=self.inputs,
            rank=self.info.rank,
            fsdp=self.config.fsdp,
            allow_schedule_change=allow_schedule_change,
        )
        self.bad_steps = restored.bad_steps
        self.skipped_steps = restored.skipped_steps
        self.wall_before = restored.wall_seconds
        self.schedule_changes = restored.schedule_changes
        self.last_checkpoint = path
        self.saved_step = restored.step
        if restored.changes and self.info.is_main:
            detail = ", ".join(f"{key} {old} -> {new}" for key, (old, new) in restored.changes.items())
            print(f"semisparse: resuming {path} with a new schedule: {detail}", file=sys.stderr)
        return restored.step, restored.event()

    def _wall(self) -> float:
        return self.wall_before + time.perf_counter() - self.started

    # --- the loop -----------------------------------------------------------------------------------
    def train(self, resume: str | Path | None, overwrite: bool, allow_schedule_change: bool = False) -> Path:
        config = self.config
        config.check_model(context_length(self.model))
        found = check_output(config, resume, overwrite)
        resume_path = found if resume is not None else None
        self.started = time.perf_counter()
        # Everything that can fail on the inputs fails before the output directory is touched.
        loaded = load_inputs(config, self.tokenizer, self.info, self.progress)
        self.sequences, self.corpus_info, self.inputs = loaded.sequences, loaded.corpus_info, loaded.pins
        self.eval_ids, self.eval_source = load_eval_ids(config, self.tokenizer)
        self.eval_bos = window_bos(self.tokenizer)
        self.rundir.prepare(config, self.info, resume_path is not None)
        self.last_checkpoint = resume_path
        try:
            return self._train(resume_path, allow_schedule_change)
        except KeyboardInterrupt as err:  # a second SIGINT/SIGTERM, or one outside the steps
            message = self._abort_message()
            self.rundir.discard()
            raise TrainingInterrupted(message) from err
        except BaseException:
            self.rundir.discard()  # a new run that never checkpointed: the old run stays
            raise

    def _train(self, resume_path: Path | None, allow_schedule_change: bool) -> Path:
        config, info = self.config, self.info
        if config.gradient_checkpointing and getattr(self.model, "supports_gradient_checkpointing", False):
            # transformers 5 renamed the switch; older releases only have the first name
            enable = getattr(self.model, "activation_checkpointing_enable", None)
            (enable or self.model.gradient_checkpointing_enable)()
        self.model.train()
        if config.fsdp:
            distributed.shard_model(self.model, info, self.device)
        else:
            distributed.broadcast_module(self.model, info)
        self.optimizer = self.method.make_optimizer(self.method.parameter_groups(), config)
        warmup = config.warmup(self.total)
        self.scheduler = make_scheduler(self.optimizer, self.total, warmup, config.min_lr_ratio)
        self.params = [p for group in self.optimizer.param_groups for p in group["params"]]

        start, event = 0, None
        if resume_path is not None:
            start, event = self._restore(resume_path, allow_schedule_change)
            if info.is_main:
                config.to_yaml(self.rundir.path / CONFIG_FILE)
        else:
            seed = config.seed + info.rank
            random.seed(seed)
            np.random.seed(seed)
            torch.manual_seed(seed)
        self.step_done = start
        resume_step = start if resume_path is not None else None
        # Resuming the final checkpoint evaluates again: its logged evaluation (if any) is replaced.
        rerun_eval = resume_path is not None and start >= self.total
        self.metrics = MetricsLog(self.rundir.path, info.is_main, config.tensorboard, resume_step, rerun_eval)
        try:
            if event is not None:
                self.metrics.write(event)
            final_eval = self._steps(start)
            return self._export(final_eval)
        finally:
            self.metrics.close()

    def _abort_message(self) -> str:
        if self.metrics is None:
            where = "aborted before training started"
        else:
            where = f"aborted after step {self.step_done} of {self.total}"
        if self.last_checkpoint is None:
            unchanged = f"; the previous run in {self.out} is unchanged" if self.rundir.staging else ""
            return f"{where}; no checkpoint was written{unchanged}"
        return (
            f"{where}; the last checkpoint is {self.last_checkpoint}: continue with the same settings "
            "plus `resume`"
        )

    def _steps(self, start: int) -> dict[str, Any] | None:
        config, info = self.config, self.info
        if start == 0 and config.eval_every:
            self._evaluate(0)
        stop = StopRequests()
        bar = tqdm(
            total=self.total,
            initial=start,
            desc=f"train {self.method.name}",
            unit="step",
            disable=not self.progress,
        )
        with stop.installed(), bar:
            for step in range(start, self.total):
                done = step + 1
                row = self._step(step)
                self.step_done = done
                self.metrics.write(row)
                bar.update(1)
                bar.set_postfix(loss=f"{row['loss']:.4g}", lr=f"{row['lr']:.3g}", refresh=False)
                if self.bad_steps >= config.max_bad_steps:
                    raise SemisparseError(
                        f"loss or gradients not finite for {self.bad_steps} steps in a row (step {done}); "
                        f"{self._lower_lr_advice()}, or check the corpus"
                    )
                if config.eval_every and done % config.eval_every == 0 and done < self.total:
                    self._evaluate(done)
                stopping = distributed.any_rank(stop.requested, info, self.device)
                periodic = config.checkpoint_every and done % config.checkpoint_every == 0
                # Inside a run of skipped steps nothing is saved, so the last good checkpoint survives.
                saved = None
                if (stopping or (periodic and done < self.total)) and self.bad_steps == 0:
                    saved = self._save(done)
                if stopping:
                    kept = saved or self.last_checkpoint
                    if kept is None:
                        raise TrainingInterrupted(
                            f"interrupted after step {done} of {self.total}, inside a run of non-finite "
                            "steps; no checkpoint was written"
                        )
                    raise TrainingInterrupted(
                        f"interrupted after step {done} of {self.total}; checkpoint {kept}; "
                        "continue with the same settings plus `resume`"
                    )
        # The last step's checkpoint, so a failed evaluation or export loses no training.
        if self.saved_step != self.total:
            self._save(self.total)
        return self._evaluate(self.total)

    def _step(self, step: int) -> dict[str, Any]:
        config, info = self.config, self.info
        began = time.perf_counter()
        row: dict[str, Any] = {"kind": "train", "step": step + 1, "tokens": (step + 1) * self.tokens_per_step}
        lr = self.scheduler.get_last_lr()[0]
        scheduled = self.method.before_step(step)
        first = step * self.global_batch + info.rank * config.micro_batch * config.grad_accum
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        parts: dict[str, float] = {}
        for micro in range(config.grad_accum):
            start = first + micro * config.micro_batch
            batch = self.sequences.batch(start, config.micro_batch).to(self.device)
            if config.fsdp:
                distributed.set_gradient_sync(self.model, micro == config.grad_accum - 1)
            with self._autocast():
                loss, loss_parts = self.method.loss(batch, step)
            (loss / config.grad_accum).backward()
            loss_sum += loss.detach().double()
            for key, value in loss_parts.items():
                parts[key] = parts.get(key, 0.0) + float(value) / config.grad_accum
        mean_loss = distributed.mean_over_ranks(loss_sum.item() / config.grad_accum, info, self.device)
        if not config.fsdp:
            distributed.average_gradients(self.params, info)
        max_norm = config.grad_clip if config.grad_clip > 0 else math.inf
        grad_norm = float(distributed.local(torch.nn.utils.clip_grad_norm_(self.params, max_norm)))
        finite = math.isfinite(mean_loss) and math.isfinite(grad_norm)
        updated: dict[str, float] = {}
        if finite:
            self.optimizer.step()
            updated = self.method.after_step(step)
            self.bad_steps = 0
        else:
            self.bad_steps += 1
            self.skipped_steps += 1
            row["kind"] = "skip"
            message = f"semisparse: step {step + 1} skipped: loss {mean_loss}, gradient norm {grad_norm}"
            print(message, file=sys.stderr)
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        seconds = time.perf_counter() - began
        row.update({"loss": mean_loss, **parts, "lr": lr, "grad_norm": grad_norm, **scheduled, **updated})
        row.update(
            {
                "skipped_steps": self.skipped_steps,
                "epoch": self.sequences.epochs((step + 1) * self.global_batch),
                "step_seconds": seconds,
                "tokens_per_s": self.tokens_per_step / seconds if seconds > 0 else None,
                "memory_bytes": memory_bytes(self.device),
            }
        )
        return row

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        return autocast(self.config.autocast, self.device)

    # --- output -------------------------------------------------------------------------------------
    def _export(self, final_eval: dict[str, Any] | None) -> Path:
        """Rank 0 writes OUT/model via `method.export` (under FSDP from an unsharded copy on CPU)."""
        self.model.eval()
        method = unsharded_method(self.method, self.optimizer, self.info, self.config.fsdp, self.rebuild)
        if self.info.is_main:
            record = functools.partial(self._training_record, final_eval)
            pin = self.inputs["model"]
            write_model(self.rundir.path / MODEL_DIR, method, self.tokenizer, self.config.model, pin, record)
        distributed.barrier(self.info)
        return self.out / MODEL_DIR

    def _training_record(self, final_eval: dict[str, Any] | None) -> dict[str, Any]:
        final = None
        if final_eval is not None:
            final = {k: final_eval[k] for k in ("eval_ppl", "eval_loss", "eval_windows", "eval_seqlen")}
            final["corpus"] = self.eval_source
        return {
            "config": self.config.to_dict(),
            "method": self.method.name,
            "world_size": self.info.world_size,
            "device": str(self.device),
            "steps": self.total,
            "tokens_seen": self.total * self.tokens_per_step,
            "sequences_seen": self.total * self.global_batch,
            "epochs": self.sequences.epochs(self.total * self.global_batch),
            "skipped_steps": self.skipped_steps,
            "warmup_steps": self.config.warmup(self.total),
            "corpus": self.corpus_info,
            "base_model": {"name": self.config.model, **self.inputs["model"]},
            "schedule_changes": self.schedule_changes,
            "final_eval": final,
            "wall_seconds": round(self._wall(), 2),
        }
