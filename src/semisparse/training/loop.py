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
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import shutil
import signal
import sys
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
from semisparse.training.config import TrainConfig
from semisparse.training.corpus import PackedSequences, load_token_stream, resolve_corpus
from semisparse.training.method import TrainingMethod, default_optimizer
from semisparse.training.metrics import MetricsLog, memory_bytes
from semisparse.training.schedule import make_scheduler

__all__ = ["MethodFactory", "TrainingInterrupted", "TrainingMethod", "default_optimizer", "launch", "run"]

CONFIG_FILE = "config.yaml"
MODEL_DIR = "model"


# (total_steps, device, initialise) -> the method; see `TrainingMethod.from_pretrained`.
MethodFactory = Callable[[int, str, bool], TrainingMethod]


class TrainingInterrupted(SemisparseError):
    """SIGINT/SIGTERM: the current step finished and a checkpoint was written."""


def launch(
    config: TrainConfig,
    make_method: MethodFactory,
    *,
    resume: str | Path | None = None,
    overwrite: bool = False,
    progress: bool = True,
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
        return trainer.train(resume, overwrite)
    finally:
        distributed.teardown(info)


def run(
    config: TrainConfig,
    method: TrainingMethod,
    *,
    resume: str | Path | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Train `method` as `config` says and export the final model; returns the model directory OUT/model.

    `resume`: `"latest"` (this run's newest checkpoint), a run directory or a checkpoint directory.
    Raises `TrainingInterrupted` after checkpointing on SIGINT/SIGTERM.
    """
    info, _ = distributed.setup(config.device)
    try:
        config.check_world(info.world_size)
        return _Trainer(config, method, info, progress, None).train(resume, overwrite)
    finally:
        distributed.teardown(info)


def _check_output(config: TrainConfig, resume: str | Path | None, overwrite: bool) -> Path:
    out = Path(config.output).expanduser()
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
            "(send again to abort without a checkpoint)",
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

    # --- set-up -------------------------------------------------------------------------------------
    def _prepare_output(self, resume: str | Path | None, overwrite: bool) -> Path | None:
        found = _check_output(self.config, resume, overwrite)
        distributed.barrier(self.info)
        if self.info.is_main:
            if resume is None and self.out.exists():
                shutil.rmtree(self.out)
            self.out.mkdir(parents=True, exist_ok=True)
            self.config.to_yaml(self.out / CONFIG_FILE)
        distributed.barrier(self.info)
        return found if resume is not None else None

    def _load_corpus(self) -> None:
        source = resolve_corpus(self.config.corpus)
        if self.info.is_main:
            stream, self.corpus_info = load_token_stream(source, self.tokenizer, self.progress)
        distributed.barrier(self.info)
        if not self.info.is_main:
            stream, self.corpus_info = load_token_stream(source, self.tokenizer, False)
        self.sequences = PackedSequences(stream, self.config.seq_len, self.config.seed)

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
                f"the weights are not finite at step {step}; not checkpointing over the last good one "
                f"({self.last_checkpoint}); lower `lr` and resume from it"
            )
        model_state, optim_state = distributed.full_state(self.model, self.optimizer, self.config.fsdp)
        rng = distributed.gather_objects(checkpoint.rng_state(), self.info)
        method_state = self.method.state_dict()
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
        }
        meta = {
            "fields": self._fingerprint_fields(),
            "fingerprint": self.config.fingerprint(),
            "total_steps": self.total,
            "data_position": step * self.global_batch,
            "tokens_seen": step * self.tokens_per_step,
        }
        keep = self.config.keep_checkpoints
        self.last_checkpoint = checkpoint.save_checkpoint(self.out, step, state, meta, keep)
        return self.last_checkpoint

    def _restore(self, path: Path) -> int:
        meta = checkpoint.read_meta(path)
        checkpoint.check_compatible(path, meta, self._fingerprint_fields())
        state = checkpoint.load_state(path, meta)
        try:
            distributed.load_full_state(
                self.model, self.optimizer, state["model"], state["optimizer"], self.config.fsdp
            )
            self.scheduler.load_state_dict(state["scheduler"])
            self.method.load_state_dict(state["method"])
        except (RuntimeError, KeyError, ValueError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise SemisparseError(
                f"checkpoint {path} does not fit this model/method ({first[:120]}); "
                "start over with `overwrite`"
            ) from err
        rngs = state["rng"]
        checkpoint.set_rng_state(rngs[self.info.rank] if self.info.rank < len(rngs) else rngs[0])
        self.bad_steps = state["bad_steps"]
        self.skipped_steps = state["skipped_steps"]
        self.wall_before = state["wall_seconds"]
        self.last_checkpoint = path
        return int(state["step"])

    def _wall(self) -> float:
        return self.wall_before + time.perf_counter() - self.started

    # --- the loop -----------------------------------------------------------------------------------
    def train(self, resume: str | Path | None, overwrite: bool) -> Path:
        config, info = self.config, self.info
        config.check_model(context_length(self.model))
        resume_path = self._prepare_output(resume, overwrite)
        self.started = time.perf_counter()
        self._load_corpus()
        self.eval_ids = self._load_eval_ids()

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

        start = 0
        if resume_path is not None:
            start = self._restore(resume_path)
        else:
            seed = config.seed + info.rank
            random.seed(seed)
            np.random.seed(seed)
            torch.manual_seed(seed)
        self.metrics = MetricsLog(self.out, info.is_main, config.tensorboard, start if resume_path else None)
        try:
            final_eval = self._steps(start)
        finally:
            self.metrics.close()
        return self._export(final_eval)

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
                self.metrics.write(row)
                bar.update(1)
                bar.set_postfix(loss=f"{row['loss']:.4g}", lr=f"{row['lr']:.3g}", refresh=False)
                if self.bad_steps >= config.max_bad_steps:
                    raise SemisparseError(
                        f"loss or gradients not finite for {self.bad_steps} steps in a row (step {done}); "
                        f"last good checkpoint: {self.last_checkpoint}; lower `lr` or check the corpus"
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
                    raise TrainingInterrupted(
                        f"interrupted after step {done} of {self.total}; checkpoint {kept}; "
                        "continue with the same settings plus `resume`"
                    )
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
        target = self.out / MODEL_DIR
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
                metadata = provenance(**method_meta, training=self._training_record(final_eval))
                (tmp / METADATA_FILE).write_text(json.dumps(metadata, indent=2, default=str) + "\n")
        distributed.barrier(self.info)
        return target

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
            "final_eval": final,
            "wall_seconds": round(self._wall(), 2),
        }
