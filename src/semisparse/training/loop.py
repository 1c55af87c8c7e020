"""The shared training loop: a `TrainingMethod` supplies the model, loss and hooks; the loop does the rest.

Run directory layout (`config.output`):

    OUT/config.yaml           the validated TrainConfig (method settings under `method`)
    OUT/metrics.jsonl         one JSON row per optimizer step and per evaluation
    OUT/checkpoints/step-N/   the newest resumable checkpoints
    OUT/tensorboard/          with `tensorboard`
    OUT/model/                the final model (plain transformers layout) with semisparse.json

Optimizer step `s` (0-based) consumes global sequences s·G .. s·G+G-1 (G = micro_batch · grad_accum ·
world_size) of the corpus order; rank r takes its contiguous slice of them, split into `grad_accum`
micro-batches. Per step the loop calls `before_step`, then `loss` and backward per micro-batch (loss
divided by `grad_accum`), averages gradients over ranks, clips, and, if the loss and gradient norm are
finite, steps the optimizer and calls `after_step`. A non-finite step is skipped (gradients dropped, no
`after_step`) but still advances the step, data position and LR schedule, so the budget stays exact.

Checkpoints are written every `checkpoint_every` steps, on SIGINT/SIGTERM and after the last step (before
the final evaluation and export, so a failed export loses no training; resuming that checkpoint only
evaluates and exports). Each pins the run's inputs: the corpus (sha256 of the file, tokenizer, token
count) and the base model (sha256 of its weight files); resuming on other inputs is refused. Resuming
with another `lr`, `min_lr_ratio`, `warmup_steps` or `grad_clip` needs `allow_schedule_change` and is
logged as an `event` row `{"event": "schedule_change", ...}` in metrics.jsonl and in the provenance.

Inputs (config, corpus, evaluation text, model) are loaded before OUT is touched. `overwrite` builds the
new run in a hidden sibling `.OUT.overwrite-*` and swaps it for the old run only at the new run's first
checkpoint (periodic, on a signal, or the final one), so a run that fails before then leaves the old run
as it was. An output directory that is or contains the input model is refused.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from semisparse.data import evaluation_text
from semisparse.errors import SemisparseError
from semisparse.evaluation.perplexity import perplexity, tokenize_text
from semisparse.export import METADATA_FILE, atomic_directory, provenance
from semisparse.models import load_tokenizer
from semisparse.modules import context_length
from semisparse.training import checkpoint, distributed
from semisparse.training.config import SCHEDULE_FIELDS, TrainConfig
from semisparse.training.corpus import PackedSequences, load_token_stream, resolve_corpus
from semisparse.training.method import TrainingMethod, default_optimizer
from semisparse.training.metrics import METRICS_FILE, MetricsLog, memory_bytes
from semisparse.training.schedule import make_scheduler

__all__ = ["MethodFactory", "TrainingInterrupted", "TrainingMethod", "default_optimizer", "launch", "run"]

CONFIG_FILE = "config.yaml"
MODEL_DIR = "model"
# Hidden siblings of OUT: a run being built by `overwrite`, and an old run being swapped out.
_STAGING = ".overwrite-"
_RETIRED = ".old-"


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
        _check_output(config, resume, overwrite)
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


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def _check_output(config: TrainConfig, resume: str | Path | None, overwrite: bool) -> Path:
    out = Path(config.output).expanduser()
    target = out.resolve()
    model = Path(config.model).expanduser()
    if model.exists() and _inside(model.resolve(), target):
        raise SemisparseError(
            f"the output directory {out} is or contains the input model {config.model}: training would "
            "replace it; choose another `output`"
        )
    if overwrite and resume is None:
        for name in ("corpus", "eval_corpus"):
            path = Path(getattr(config, name)).expanduser()
            if path.is_file() and _inside(path.resolve(), target):
                raise SemisparseError(
                    f"`{name}` {path} lies in {out}, which `overwrite` replaces; move it or choose another "
                    "`output`"
                )
    if resume is not None:
        if (out / MODEL_DIR).exists():
            raise SemisparseError(f"the run in {out} already finished ({out / MODEL_DIR}); nothing to resume")
        return checkpoint.resolve_resume(resume, out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not overwrite:
            raise SemisparseError(
                f"output directory {out} already exists: choose another `output`, `resume` to continue it "
                "or `overwrite` to start over"
            )
        if not (out / CONFIG_FILE).is_file() and not (out / METADATA_FILE).is_file():
            raise SemisparseError(
                f"{out} is not a semisparse run directory; not overwriting it, choose another `output`"
            )
    return out


class _StopRequests:
    """SIGINT/SIGTERM set a flag so the loop finishes its step and checkpoints; a second signal aborts."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print(
            f"\nsemisparse: {signal.Signals(signum).name} received, checkpointing after this step "
            "(send again to abort at once; the last checkpoint stays)",
            file=sys.stderr,
        )

    @contextlib.contextmanager
    def installed(self) -> Iterator[_StopRequests]:
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        for signum in (signal.SIGINT, signal.SIGTERM):
            self._previous[signum] = signal.signal(signum, self._handle)
        try:
            yield self
        finally:
            for signum, handler in self._previous.items():
                signal.signal(signum, handler)


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
        self.corpus_info: dict[str, Any] = {}
        self.sequences: PackedSequences | None = None
        self.eval_source: dict[str, Any] | None = None
        self.eval_ids: torch.Tensor | None = None
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
        # Where this run writes: OUT, or (main rank, `overwrite`) a sibling that replaces OUT at the first
        # checkpoint. What it was trained on, pinned in every checkpoint; schedule changes on resume.
        self.run_dir = self.out
        self.staging: Path | None = None
        self.inputs: dict[str, Any] = {}
        self.schedule_changes: list[dict[str, Any]] = []

    # --- set-up -------------------------------------------------------------------------------------
    def _prepare_output(self, resuming: bool) -> None:
        """Main rank: remove what killed processes left behind, then set up the directory to write into.

        A fresh run writes `config.yaml` now; a resumed one once its checkpoint has been accepted. A fresh
        run where a non-empty OUT exists (`overwrite`, checked) is built in a hidden sibling instead.
        """
        distributed.barrier(self.info)
        if self.info.is_main:
            self._clean_stale()
            try:
                if not resuming and self.out.is_dir() and any(self.out.iterdir()):
                    self.out.parent.mkdir(parents=True, exist_ok=True)
                    prefix = f".{self.out.name}{_STAGING}"
                    self.staging = Path(tempfile.mkdtemp(prefix=prefix, dir=self.out.parent))
                    umask = os.umask(0)
                    os.umask(umask)
                    self.staging.chmod(0o777 & ~umask)
                    self.run_dir = self.staging
                self.run_dir.mkdir(parents=True, exist_ok=True)
                if not resuming:
                    self.config.to_yaml(self.run_dir / CONFIG_FILE)
            except OSError as err:
                raise SemisparseError(
                    f"cannot write the run directory {self.run_dir} ({err.strerror or type(err).__name__}); "
                    "choose a writable `output`"
                ) from err
        distributed.barrier(self.info)

    def _clean_stale(self) -> None:
        """Temporary directories of this run that a killed process left: unfinished checkpoints and exports
        inside OUT, and unfinished `overwrite` runs and swaps beside it."""
        stale = checkpoint.clean_stale(self.out)
        patterns = [f".{self.out.name}{_STAGING}*", f".{self.out.name}{_RETIRED}*"]
        found = (
            [p for pattern in patterns for p in self.out.parent.glob(pattern)]
            if self.out.parent.is_dir()
            else []
        )
        if self.out.is_dir():
            found += [
                p
                for pattern in (f".{MODEL_DIR}.tmp-*", f".{MODEL_DIR}.old-*")
                for p in self.out.glob(pattern)
            ]
        for path in found:
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
                stale.append(path)
        if stale:
            print(
                f"semisparse: removed {len(stale)} unfinished temporary directories of {self.out}",
                file=sys.stderr,
            )

    def _promote(self) -> None:
        """Main rank, at the first checkpoint of an `overwrite` run: the new run replaces the old one."""
        staging, out = self.staging, self.out
        retired = None
        try:
            if out.exists():
                retired = Path(tempfile.mkdtemp(prefix=f".{out.name}{_RETIRED}", dir=out.parent))
                os.replace(out, retired / out.name)
            os.replace(staging, out)
            checkpoint.fsync_path(out.parent)
        except OSError as err:
            if retired is not None and (retired / out.name).exists() and not out.exists():
                os.replace(retired / out.name, out)  # put the old run back
            self.staging = None  # keep the new run's checkpoint where it is for the user to move
            raise SemisparseError(
                f"cannot replace the old run in {out} by the new one in {staging} "
                f"({err.strerror or type(err).__name__}); move it there by hand, then continue with `resume`"
            ) from err
        if retired is not None:
            shutil.rmtree(retired, ignore_errors=True)
        self.staging = None
        self.run_dir = out
        if self.metrics is not None:
            self.metrics.path = out / METRICS_FILE
        if self.last_checkpoint is not None:
            self.last_checkpoint = out / self.last_checkpoint.relative_to(staging)

    def _discard_staging(self) -> None:
        if self.staging is not None:
            shutil.rmtree(self.staging, ignore_errors=True)
            self.staging = None
            self.run_dir = self.out

    def _load_inputs(self) -> None:
        """The corpus as token stream, and the pins of corpus and base model that checkpoints record."""
        source = resolve_corpus(self.config.corpus)
        if self.info.is_main:
            stream, self.corpus_info = load_token_stream(source, self.tokenizer, self.progress)
            model = checkpoint.model_identity(self.config.model)
        distributed.barrier(self.info)
        if not self.info.is_main:
            stream, self.corpus_info = load_token_stream(source, self.tokenizer, False)
            model = checkpoint.model_identity(self.config.model)  # hashes cached by the main rank
        self.sequences = PackedSequences(stream, self.config.seq_len, self.config.seed)
        corpus = {key: self.corpus_info[key] for key in ("sha256", "tokenizer_key", "tokens")}
        self.inputs = {"corpus": corpus, "model": model}

    def _load_eval_ids(self) -> torch.Tensor | None:
        config = self.config
        if not config.eval_windows:
            return None
        text, self.eval_source = evaluation_text(config.eval_corpus)
        return tokenize_text(self.tokenizer, text)[: config.eval_windows * config.effective_eval_seqlen()]

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        mode = self.config.autocast
        if mode == "bf16" or (mode == "auto" and self.device.type == "cuda"):
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _fingerprint_fields(self) -> dict[str, Any]:
        fields = {f"config.{k}": v for k, v in self.config.fingerprint_fields().items()}
        return {**fields, "method": self.method.name, "world_size": self.info.world_size}

    # --- evaluation and checkpoints ------------------------------------------------------------------
    def _evaluate(self, step: int) -> dict[str, Any] | None:
        if self.eval_ids is None:
            return None
        with self._autocast():
            result = perplexity(
                self.model,
                self.eval_ids,
                self.config.effective_eval_seqlen(),
                self.config.eval_windows,
                batch_size=self.config.micro_batch,
                progress=False,
            )
        row = {
            "kind": "eval",
            "step": step,
            "tokens": step * self.tokens_per_step,
            "eval_ppl": result.perplexity,
            "eval_loss": result.mean_nll,
            "eval_windows": result.n_windows,
            "eval_seqlen": result.seqlen,
        }
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
            "fields": self._fingerprint_fields(),
            "fingerprint": self.config.fingerprint(),
            "inputs": self.inputs,
            "total_steps": self.total,
            "data_position": step * self.global_batch,
            "tokens_seen": step * self.tokens_per_step,
        }
        keep = self.config.keep_checkpoints
        self.last_checkpoint = checkpoint.save_checkpoint(self.run_dir, step, state, meta, keep)
        if self.staging is not None:
            self._promote()
        return self.last_checkpoint

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
        meta = checkpoint.read_meta(path)
        schedule = frozenset(f"config.{name}" for name in SCHEDULE_FIELDS)
        expected = self._fingerprint_fields()
        changes = checkpoint.check_compatible(path, meta, expected, schedule, allow_schedule_change)
        checkpoint.check_inputs(path, meta, self.inputs)
        state = checkpoint.load_state(path, meta)
        # The schedule this run's config asks for, before the checkpoint's replaces it.
        fresh_bases = list(self.scheduler.base_lrs)
        fresh_factors = [dict(vars(factor)) for factor in self.scheduler.lr_lambdas]
        try:
            distributed.load_full_state(
                self.model, self.optimizer, state["model"], state["optimizer"], self.config.fsdp
            )
            self.scheduler.load_state_dict(state["scheduler"])
            self.method.load_state_dict(state["method"])
            rngs = state["rng"]
            checkpoint.set_rng_state(rngs[self.info.rank] if self.info.rank < len(rngs) else rngs[0])
        except (RuntimeError, KeyError, ValueError, TypeError, IndexError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise SemisparseError(
                f"checkpoint {path} does not fit this model/method ({first[:120]}); "
                "start over with `overwrite`"
            ) from err
        step = int(state["step"])
        self.bad_steps = state["bad_steps"]
        self.skipped_steps = state["skipped_steps"]
        self.wall_before = state.get("wall_seconds", 0.0)
        self.schedule_changes = list(state.get("schedule_changes") or [])
        self.last_checkpoint = path
        self.saved_step = step
        if not changes:
            return step, None
        # Continue the checkpoint's step count on the new schedule: new peak lrs and warm-up/cosine shape.
        for factor, values in zip(self.scheduler.lr_lambdas, fresh_factors, strict=True):
            vars(factor).update(values)
        self.scheduler.base_lrs = fresh_bases
        epoch = self.scheduler.last_epoch
        lrs = [
            base * factor(epoch) for base, factor in zip(fresh_bases, self.scheduler.lr_lambdas, strict=True)
        ]
        for group, base, lr in zip(self.optimizer.param_groups, fresh_bases, lrs, strict=True):
            group["initial_lr"], group["lr"] = base, lr
        self.scheduler._last_lr = lrs
        named = {key.removeprefix("config."): value for key, value in changes.items()}
        event = {"kind": "event", "event": "schedule_change", "step": step, "changes": named}
        self.schedule_changes.append({"step": step, "changes": named})
        if self.info.is_main:
            detail = ", ".join(f"{key} {old} -> {new}" for key, (old, new) in named.items())
            print(f"semisparse: resuming {path} with a new schedule: {detail}", file=sys.stderr)
        return step, event

    def _wall(self) -> float:
        return self.wall_before + time.perf_counter() - self.started

    # --- the loop -----------------------------------------------------------------------------------
    def train(self, resume: str | Path | None, overwrite: bool, allow_schedule_change: bool = False) -> Path:
        config = self.config
        config.check_model(context_length(self.model))
        found = _check_output(config, resume, overwrite)
        resume_path = found if resume is not None else None
        self.started = time.perf_counter()
        # Everything that can fail on the inputs fails before the output directory is touched.
        self._load_inputs()
        self.eval_ids = self._load_eval_ids()
        self._prepare_output(resume_path is not None)
        self.last_checkpoint = resume_path
        try:
            return self._train(resume_path, allow_schedule_change)
        except KeyboardInterrupt as err:  # a second SIGINT/SIGTERM, or one outside the steps
            message = self._abort_message()
            self._discard_staging()
            raise TrainingInterrupted(message) from err
        except BaseException:
            self._discard_staging()  # a new run that never checkpointed: the old run stays
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
                config.to_yaml(self.run_dir / CONFIG_FILE)
        else:
            seed = config.seed + info.rank
            random.seed(seed)
            np.random.seed(seed)
            torch.manual_seed(seed)
        self.step_done = start
        resume_step = start if resume_path is not None else None
        # Resuming the final checkpoint evaluates again: its logged evaluation (if any) is replaced.
        rerun_eval = resume_path is not None and start >= self.total
        self.metrics = MetricsLog(self.run_dir, info.is_main, config.tensorboard, resume_step, rerun_eval)
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
            unchanged = f"; the previous run in {self.out} is unchanged" if self.staging is not None else ""
            return f"{where}; no checkpoint was written{unchanged}"
        return (
            f"{where}; the last checkpoint is {self.last_checkpoint}: continue with the same settings "
            "plus `resume`"
        )

    def _steps(self, start: int) -> dict[str, Any] | None:
        config, info = self.config, self.info
        if start == 0 and config.eval_every:
            self._evaluate(0)
        stop = _StopRequests()
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

    # --- output -------------------------------------------------------------------------------------
    def _export(self, final_eval: dict[str, Any] | None) -> Path:
        """Rank 0 writes OUT/model via `method.export`. Under FSDP the weights are gathered and loaded into
        a freshly built, unsharded copy of the method on CPU, which then exports."""
        target = self.run_dir / MODEL_DIR
        self.model.eval()
        method = self.method
        if self.config.fsdp:
            model_state, _ = distributed.full_state(self.model, self.optimizer, sharded=True)
            method_state = self.method.state_dict()
            if self.info.is_main:
                method = self.rebuild()
                method.model.load_state_dict(model_state)
                method.load_state_dict(method_state)
                method.model.eval()
        if self.info.is_main:
            with atomic_directory(target, overwrite=False) as tmp:
                method_meta = dict(method.export(tmp) or {})
                if not (tmp / "tokenizer_config.json").is_file():
                    self.tokenizer.save_pretrained(tmp)
                method_meta.setdefault("method", method.name)
                method_meta.setdefault("base_model", self.config.model)
                if method_meta["base_model"] == self.config.model:
                    method_meta.setdefault("base_model_path", self.inputs["model"]["path"])
                    method_meta.setdefault("base_model_sha256", self.inputs["model"]["sha256"])
                metadata = provenance(**method_meta, training=self._training_record(final_eval))
                (tmp / METADATA_FILE).write_text(json.dumps(metadata, indent=2, default=str) + "\n")
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
