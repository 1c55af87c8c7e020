"""Block-wise reconstruction: train a pruned model's kept weights, block by block, to match the dense model.

For each decoder block in order, on the calibration windows:

* inputs: the hidden states the already reconstructed sparse blocks produce (`inputs="sparse"`), or the
  dense model's (`"dense"`);
* units and their targets, by `granularity`: `attn-mlp` trains the attention sub-block against the dense
  attention's output on the same input, then the MLP sub-block on the input the reconstructed attention
  gives against the dense MLP's output on that input (`semisparse.reconstruction.blocks`); `block` trains
  the whole block against the dense block; `linear` trains each target matrix alone against the dense
  matrix on the same input (SparseGPT's objective), in module order;
* training: AdamW on the kept weights (and the targets' biases), micro-batches of windows, `epochs`
  passes, linear warm-up then cosine; loss = MSE / variance of the target. The gradients of pruned weights
  are zeroed and the mask is reapplied after every step, so they stay exactly zero.
* `learn_mask`: the unit's targets (those matching `mask_layers`, if set) become MaskLLM layers
  (`semisparse.maskllm`) whose logits start from the pruned mask with strength `alpha`, with pruned
  positions holding their dense weights; logits and weights train jointly on the same local loss while τ
  and κ anneal over the unit's steps; then the argmax mask is fixed and the kept weights get
  `fixed_mask_steps` × the steps more, so what ships is what was trained.

Only the current dense and sparse block, the activations of one depth (stream, unit inputs and targets)
and one unit's optimizer state are live; with `device` set, a block goes there only while it is processed
(the models stay where they are). Each block's randomness (window order, Gumbel noise, logit init) comes
from a seed of its own, so a run resumed at a block boundary is bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm
from transformers.pytorch_utils import Conv1D

from semisparse import nm
from semisparse.errors import SemisparseError
from semisparse.maskllm.candidates import overlaps
from semisparse.maskllm.layer import LearnableMaskLinear
from semisparse.maskllm.swap import detach_learnable_masks
from semisparse.modules import decoder_blocks, layer_filter, set_submodule, weight_matrix
from semisparse.nm import NMPattern
from semisparse.pruning.engine import (
    _block_output,
    _calibration_mode,
    _capture_block_inputs,
    _first_device,
    _targets_by_block,
)
from semisparse.reconstruction.blocks import Call, partial_forward, run_sub_block, sub_blocks
from semisparse.reconstruction.config import ReconstructConfig
from semisparse.reconstruction.units import (
    Activations,
    BlockCallback,
    BlockState,
    LossStats,
    Unit,
    batches,
    block_rng,
    block_seed,
    per_window,
    restore,
    snapshot,
    store_rows,
    units_of,
)
from semisparse.runtime import autocast
from semisparse.training.optim import adamw
from semisparse.training.schedule import WarmupCosine


class Reconstructor:
    """Runs the reconstruction of `sparse_model` against `dense_model` in place (see the module doc)."""

    def __init__(
        self,
        dense_model: nn.Module,
        sparse_model: nn.Module,
        config: ReconstructConfig,
        pattern: NMPattern,
        targets: Sequence[str],
        device: str | torch.device | None = None,
        progress: bool = True,
    ) -> None:
        self.dense_model, self.sparse_model = dense_model, sparse_model
        self.config, self.pattern = config, pattern
        self.device = torch.device(device) if device is not None else None
        self.progress = progress
        self.dense_blocks = decoder_blocks(dense_model)
        self.sparse_blocks = decoder_blocks(sparse_model)
        if len(self.dense_blocks) != len(self.sparse_blocks):
            raise SemisparseError(
                f"the pruned model has {len(self.sparse_blocks)} decoder blocks, the dense one "
                f"{len(self.dense_blocks)}: pass the model it was pruned from"
            )
        modules = {name: sparse_model.get_submodule(name) for name in targets}
        grouped = _targets_by_block(self.sparse_blocks, modules)
        self.layers: list[list[str]] = []
        for b, group in enumerate(grouped):
            prefix = {id(m): n for n, m in self.sparse_blocks[b].named_modules()}
            self.layers.append([prefix[id(module)] for module in group.values()])
        for b, names in enumerate(self.layers):  # fail before any work on a block attn-mlp cannot split
            if names:
                units_of(self.sparse_blocks[b], names, config.granularity)
        self.mask_filter = layer_filter(config.mask_layers)
        named = [(b, name) for b, names in enumerate(self.layers) for name in names]
        if config.learn_mask and named and not any(self._learns(b, name) for b, name in named):
            example = ", ".join(next(names for names in self.layers if names)[:3])
            raise SemisparseError(
                f"`mask_layers` {config.mask_layers} matches no target layer; use names inside a block, "
                f"such as {example} (globs like mlp.*)"
            )

    # --- the run ---------------------------------------------------------------------------------------
    def run(
        self, calibration_ids: Tensor, start_block: int = 0, on_block: BlockCallback | None = None
    ) -> list[dict[str, Any]]:
        """Reconstruct blocks `start_block`.. (those before are taken as done: only their outputs are
        recomputed); `on_block(index, sparse_block, report)` runs after each. Returns the reports."""
        needed = [b for b, names in enumerate(self.layers) if names]
        if not needed:
            return []
        last = needed[-1]
        stream_model = self.sparse_model if self.config.inputs == "sparse" else self.dense_model
        stream_blocks = decoder_blocks(stream_model)
        reports = []
        with _calibration_mode(self.dense_model), _calibration_mode(self.sparse_model):
            with torch.no_grad():
                capture = _capture_block_inputs(
                    stream_model, stream_blocks, calibration_ids, last, self.device
                )
            hidden = capture.hidden
            capture.hidden = None
            bar = tqdm(range(last + 1), desc="reconstruct", disable=not self.progress, unit="block")
            for b in bar:
                args, kwargs = capture.block_args[b]
                if b < start_block or not self.layers[b]:
                    block = stream_blocks[b]
                    with self._on_device(block), torch.no_grad(), self._precision(block):
                        self._advance(block, hidden, args, kwargs)
                    continue
                with self._on_device(self.dense_blocks[b], self.sparse_blocks[b]):
                    state = BlockState(b, self.dense_blocks[b], self.sparse_blocks[b], args, kwargs, hidden)
                    report = self._block(state)
                reports.append(report)
                if self.progress:
                    bar.write(_describe(report, len(self.sparse_blocks)))
                if on_block is not None:
                    on_block(b, self.sparse_blocks[b], report)
        return reports

    @contextmanager
    def _on_device(self, *blocks: nn.Module) -> Iterator[None]:
        homes = [_first_device(block) for block in blocks]
        if self.device is not None:
            for block in blocks:
                block.to(self.device)
        try:
            yield
        finally:
            if self.device is not None:
                for block, home in zip(blocks, homes, strict=True):
                    if home is not None:
                        block.to(home)

    def _precision(self, block: nn.Module) -> AbstractContextManager[Any]:
        """bf16 autocast or nothing (`autocast` setting), for the device `block` runs on."""
        return autocast(self.config.autocast, _first_device(block) or torch.device("cpu"))

    def _forward(self, block: nn.Module, x: Tensor, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor:
        device = _first_device(block) or x.device
        return _block_output(block(x.to(device), *args, **kwargs)).to(x.device)

    def _advance(
        self, block: nn.Module, hidden: Tensor, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> None:
        """The stream through one block, in place, in the batches of `_block_loss` (so bit-identical)."""
        for rows in batches(hidden.shape[0], self.config.batch_size):
            hidden[rows] = self._forward(block, hidden[rows], args, kwargs)

    def _block_loss(self, state: BlockState, advance: bool) -> float:
        """Normalised MSE of the sparse block's output against the dense block's, on the stream's inputs;
        with `advance`, the stream moves on to the next block (from the same outputs)."""
        stats = LossStats()
        with torch.no_grad(), self._precision(state.sparse):
            for rows in batches(state.hidden.shape[0], self.config.batch_size):
                x = state.hidden[rows]
                sparse = self._forward(state.sparse, x, state.args, state.kwargs)
                dense = self._forward(state.dense, x, state.args, state.kwargs)
                stats.add(sparse, dense)
                if advance:
                    state.hidden[rows] = sparse if self.config.inputs == "sparse" else dense
        return stats.loss

    def _block(self, state: BlockState) -> dict[str, Any]:
        config = self.config
        began = time.perf_counter()
        if self.device is not None and self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        layers = self.layers[state.index]
        state.masks = {name: state.sparse.get_submodule(name).weight.detach() != 0 for name in layers}
        flags = {name: p.requires_grad for name, p in state.sparse.named_parameters()}
        state.sparse.requires_grad_(False)
        report: dict[str, Any] = {"block": state.index, "block_loss_before": self._block_loss(state, False)}
        start = snapshot(state, Unit("block", "block", layers)) if config.revert_worse else None
        units = {}
        changed, total = 0, 0
        try:
            with block_rng(self.device, block_seed(config.seed, state.index)):
                for unit in units_of(state.sparse, layers, config.granularity):
                    units[unit.name], flips = self._unit(state, unit)
                    changed += flips
                    total += sum(int(state.masks[name].numel()) for name in unit.layers)
        finally:
            for name, param in state.sparse.named_parameters():
                param.requires_grad_(flags.get(name, True))
        for name in layers:
            module = state.sparse.get_submodule(name)
            if not nm.is_nm(weight_matrix(module), self.pattern.n, self.pattern.m):
                raise SemisparseError(
                    f"internal error: layer {name} left {self.pattern} during reconstruction"
                )
        if start is None:
            report["block_loss_after"] = self._block_loss(state, True)
        else:  # units can each improve and the block output still drift (norms after a sub-block: Gemma)
            report["block_loss_after"] = self._block_loss(state, False)
            report["reverted"] = report["block_loss_after"] > report["block_loss_before"]
            if report["reverted"]:
                restore(state, start)
                report["block_loss_trained"] = report["block_loss_after"]
                report["block_loss_after"], changed = report["block_loss_before"], 0
            stream = state.sparse if config.inputs == "sparse" else state.dense
            with torch.no_grad(), self._precision(state.sparse):
                self._advance(stream, state.hidden, state.args, state.kwargs)
        report["units"] = units
        if config.learn_mask:
            report["mask_changed"] = changed / total if total else 0.0
        report["seconds"] = round(time.perf_counter() - began, 3)
        if self.device is not None and self.device.type == "cuda":
            report["peak_cuda_bytes"] = torch.cuda.max_memory_allocated(self.device)
        return report

    # --- one unit --------------------------------------------------------------------------------------
    def collect(self, state: BlockState, unit: Unit) -> Activations:
        """Inputs and targets of a unit over all windows, in batches of `batch_size`."""
        n = state.hidden.shape[0]
        inputs: Tensor | None = None
        targets: Tensor | None = None
        call: Call | None = None
        stats = LossStats()
        source = state.sparse if self.config.inputs == "sparse" else state.dense
        with torch.no_grad(), self._precision(state.sparse):
            for rows in batches(n, self.config.batch_size):
                x = state.hidden[rows].to(_first_device(state.sparse) or state.hidden.device)
                windows = x.shape[0]
                if unit.kind == "block":
                    inp = x
                    tgt = _block_output(state.dense(x, *state.args, **state.kwargs))
                elif unit.kind == "linear":
                    inp, _ = partial_forward(source, x, state.args, state.kwargs, input_of=unit.name)
                    tgt = state.dense.get_submodule(unit.name)(inp)
                elif unit.kind == "attn":
                    assert unit.sub is not None
                    inp, found = partial_forward(
                        state.sparse, x, state.args, state.kwargs, input_of=unit.sub.entry
                    )
                    call = call or found
                    tgt, _ = partial_forward(
                        state.dense, x, state.args, state.kwargs, output_of=unit.sub.exit
                    )
                else:  # mlp, after the attention: its input comes from the attention as reconstructed
                    assert unit.sub is not None
                    attention, _ = sub_blocks(state.sparse)
                    out, _ = partial_forward(source, x, state.args, state.kwargs, output_of=attention.exit)
                    swap = {attention.exit: out}
                    inp, found = partial_forward(
                        state.sparse, x, state.args, state.kwargs, input_of=unit.sub.entry, replace=swap
                    )
                    call = call or found
                    tgt, _ = partial_forward(
                        state.dense, x, state.args, state.kwargs, output_of=unit.sub.exit, replace=swap
                    )
                inp, tgt = per_window(inp, windows), per_window(tgt, windows)
                stats.observe(tgt)
                inputs = store_rows(inputs, n, rows.start, inp)
                targets = store_rows(targets, n, rows.start, tgt)
        assert inputs is not None and targets is not None
        return Activations(inputs, targets, stats.variance, call if unit.kind in ("attn", "mlp") else None)

    def _unit_forward(self, state: BlockState, unit: Unit, acts: Activations) -> Callable[[Tensor], Tensor]:
        block = state.sparse
        if unit.kind == "block":
            return lambda x: _block_output(block(x, *state.args, **state.kwargs))
        if unit.kind == "linear":
            return lambda x: block.get_submodule(unit.name)(x)
        assert unit.sub is not None
        sub = unit.sub
        return lambda x: run_sub_block(block, sub, x, acts.call)

    def _loss(self, state: BlockState, forward: Callable[[Tensor], Tensor], acts: Activations) -> float:
        total = 0.0
        with torch.no_grad(), self._precision(state.sparse):
            for rows in batches(acts.inputs.shape[0], self.config.batch_size):
                output = forward(acts.inputs[rows])
                total += float((output.double() - acts.targets[rows].double()).square().sum())
        return total / acts.targets.numel() / acts.variance

    def _unit(self, state: BlockState, unit: Unit) -> tuple[dict[str, Any], int]:
        """Reconstruct one unit; returns its record and how many mask entries learning changed."""
        config = self.config
        acts = self.collect(state, unit)
        forward = self._unit_forward(state, unit, acts)
        steps = config.epochs * math.ceil(acts.inputs.shape[0] / config.batch_size)
        record: dict[str, Any] = {"layers": len(unit.layers), "steps": steps}
        record["loss_before"] = self._loss(state, forward, acts)
        start = snapshot(state, unit) if config.revert_worse else None
        flips = 0
        learned = (
            [name for name in unit.layers if self._learns(state.index, name)] if config.learn_mask else []
        )
        if learned:
            prior = {name: state.masks[name] for name in learned}
            layers = self._attach(state, learned)
            record["train_loss"] = self._train(state, unit, forward, acts, steps, layers)
            record["loss_joint"] = self._loss(state, forward, acts)
            for name, layer in layers.items():
                mask = layer.argmax_mask()
                kept = mask.t().contiguous() if layer.source == "conv1d" else mask
                flips += int((kept != prior[name]).sum())
                state.masks[name] = kept
            detach_learnable_masks(state.sparse)
            for name in unit.layers:  # W ⊙ M wrote ±0.0; the fixed-mask pass keeps exact zeros
                weight = state.sparse.get_submodule(name).weight
                with torch.no_grad():
                    weight.masked_fill_(~state.masks[name], 0.0)
            fixed = math.ceil(config.fixed_mask_steps * steps)
            record["fixed_mask_steps"] = fixed
            if fixed:  # a unit's inputs and targets do not depend on its own weights: same activations
                self._train(state, unit, forward, acts, fixed, {})
            record["mask_changed"] = flips / sum(int(state.masks[n].numel()) for n in unit.layers)
        else:
            record["train_loss"] = self._train(state, unit, forward, acts, steps, {})
            if config.learn_mask:  # `mask_layers` left this unit's masks fixed
                record["mask_changed"] = 0.0
        record["loss_after"] = self._loss(state, forward, acts)
        if start is not None:
            record["reverted"] = record["loss_after"] > record["loss_before"]
            if record["reverted"]:  # Adam's fixed-size steps can only hurt a unit that starts near-exact
                restore(state, start)
                record["loss_trained"], record["loss_after"] = record["loss_after"], record["loss_before"]
                if config.learn_mask:
                    flips, record["mask_changed"] = 0, 0.0
        return record, flips

    def _learns(self, block: int, name: str) -> bool:
        """Whether `learn_mask` learns this layer's mask: its name inside the block matches `mask_layers`."""
        return self.mask_filter(self.sparse_blocks[block].get_submodule(name), name)

    def _attach(self, state: BlockState, names: Sequence[str]) -> dict[str, LearnableMaskLinear]:
        """Swap these targets for learnable-mask layers: pruned positions get their dense weights back and
        the logits start from the pruned mask with strength `alpha`."""
        generator_device = _first_device(state.sparse) or torch.device("cpu")
        generator = torch.Generator(device=generator_device).manual_seed(
            block_seed(self.config.seed, state.index)
        )
        layers = {}
        for name in names:
            module = state.sparse.get_submodule(name)
            dense = weight_matrix(state.dense.get_submodule(name)).detach()
            kept = weight_matrix(module).detach()
            mask = state.masks[name].t() if isinstance(module, Conv1D) else state.masks[name]
            weight = torch.where(mask, kept, dense.to(kept.device)).contiguous()
            source = "conv1d" if isinstance(module, Conv1D) else "linear"
            bias = None if module.bias is None else module.bias.detach().clone()
            layer = LearnableMaskLinear(weight, bias, self.pattern, source, generator)
            with torch.no_grad():
                # MaskLLM's prior π_i += α·std(π)·(⟨M0, S_i⟩ − N/2) on its N(0, 0.01²) draw; without
                # `logit_noise` on zeros (same shift), so the initial argmax is exactly the pruned mask.
                base = layer.logits if self.config.logit_noise else torch.zeros_like(layer.logits)
                shift = overlaps(mask, layer.candidates) - self.pattern.n / 2
                layer.logits.copy_(base + self.config.alpha * layer.logits.std() * shift)
            set_submodule(state.sparse, name, layer)
            layers[name] = layer
        return layers

    def _train(
        self,
        state: BlockState,
        unit: Unit,
        forward: Callable[[Tensor], Tensor],
        acts: Activations,
        steps: int,
        learnable: Mapping[str, LearnableMaskLinear],
    ) -> float:
        """AdamW with warm-up and cosine over `steps`; returns the mean loss of the last epoch's steps.

        Without `learnable`, each target's gradient is masked and its mask reapplied after each step.
        """
        config = self.config
        weights, biases, logits = [], [], []
        masked: list[tuple[Tensor, Tensor]] = []
        for name in unit.layers:
            module = state.sparse.get_submodule(name)
            weights.append(module.weight)
            if module.bias is not None and config.train_bias:
                biases.append(module.bias)
            if name in learnable:
                logits.append(learnable[name].logits)
            else:
                masked.append((module.weight, state.masks[name].to(module.weight.device)))
        groups = [{"params": weights, "lr": config.lr, "weight_decay": config.weight_decay}]
        if biases:
            groups.append({"params": biases, "lr": config.lr, "weight_decay": 0.0})
        if logits:
            groups.append({"params": logits, "lr": config.mask_lr, "weight_decay": 0.0})
        params = [p for group in groups for p in group["params"]]
        for param in params:
            param.requires_grad_(True)
        optimizer = adamw(groups, betas=(0.9, 0.95), eps=1e-8)
        schedule = WarmupCosine(steps, int(config.warmup * steps), config.min_lr_ratio)
        peaks = [group["lr"] for group in optimizer.param_groups]
        generator = torch.Generator().manual_seed(block_seed(config.seed, state.index))
        n = acts.inputs.shape[0]
        order: list[Tensor] = []
        recent: list[float] = []
        window = math.ceil(n / config.batch_size)
        for layer in learnable.values():  # sample masks; the block itself stays in eval mode (no dropout)
            layer.train()
        try:
            for step in range(steps):
                if not order:
                    order = list(torch.randperm(n, generator=generator).split(config.batch_size))
                rows = order.pop(0).to(acts.inputs.device)
                factor = schedule(step)
                for group, peak in zip(optimizer.param_groups, peaks, strict=True):
                    group["lr"] = peak * factor
                if learnable:
                    progress = step / (steps - 1) if steps > 1 else 1.0
                    tau = config.tau_start + (config.tau_end - config.tau_start) * progress
                    kappa = config.kappa_start + (config.kappa_end - config.kappa_start) * progress
                    for layer in learnable.values():
                        layer.tau, layer.kappa, layer.hard = tau, kappa, config.hard
                with self._precision(state.sparse):  # a context per step: autocast caches weight casts
                    output = forward(acts.inputs[rows])
                    loss = F.mse_loss(output.float(), acts.targets[rows].float()) / acts.variance
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                for weight, mask in masked:
                    if weight.grad is not None:
                        weight.grad.masked_fill_(~mask, 0.0)
                optimizer.step()
                with torch.no_grad():
                    for weight, mask in masked:
                        weight.masked_fill_(~mask, 0.0)
                value = loss.item()
                recent = [*recent[-(window - 1) :], value] if window > 1 else [value]
        finally:
            for param in params:
                param.requires_grad_(False)
                param.grad = None
            for layer in learnable.values():
                layer.eval()
        return sum(recent) / len(recent) if recent else float("nan")


def _describe(report: dict[str, Any], blocks: int) -> str:
    parts = [f"{name} {u['loss_before']:.4g} → {u['loss_after']:.4g}" for name, u in report["units"].items()]
    if len(parts) > 3:
        before, after = _mean(report, "loss_before"), _mean(report, "loss_after")
        parts = [f"{len(parts)} layers, mean {before:.4g} → {after:.4g}"]
    text = (
        f"block {report['block'] + 1}/{blocks}: {', '.join(parts)} "
        f"(block output {report['block_loss_before']:.4g} → {report['block_loss_after']:.4g}"
    )
    if "mask_changed" in report:
        text += f", mask changed {report['mask_changed']:.2%}"
    if report.get("reverted"):
        text += f"; trained {report['block_loss_trained']:.4g}, worse: the block kept its start"
    reverted = sum(bool(unit.get("reverted")) for unit in report["units"].values())
    if reverted:
        text += f", {reverted} unit(s) kept their start (training made them worse)"
    return text + f"), {report['seconds']:.1f} s"


def lr_hint(reports: Sequence[dict[str, Any]], lr: float, learn_mask: bool = False) -> str | None:
    """Advice when more than a quarter of the units ended worse than they started and were put back:
    with fixed masks the sign that `lr` is too high for the model (Gemma-3-270M at 3e-3: 22 of 36 units;
    at 1e-3: 2). Not with learned masks: there a third of SmolLM2's units got worse at 3e-3 and at 1e-3."""
    if learn_mask:
        return None
    units = [unit for report in reports for unit in report["units"].values()]
    reverted = sum(bool(unit.get("reverted")) for unit in units)
    if not units or reverted * 4 <= len(units):
        return None
    return (
        f"note: {reverted} of {len(units)} units got worse with training and kept their start: lr {lr:g} "
        f"is probably too high for this model; try --lr {lr / 3:.1g}"
    )


def _mean(report: dict[str, Any], key: str) -> float:
    values = [unit[key] for unit in report["units"].values()]
    return sum(values) / len(values)


def reconstruct(
    dense_model: nn.Module,
    sparse_model: nn.Module,
    config: ReconstructConfig,
    calibration_ids: Tensor,
    targets: Sequence[str],
    pattern: NMPattern,
    device: str | torch.device | None = None,
    progress: bool = True,
    start_block: int = 0,
    on_block: BlockCallback | None = None,
) -> list[dict[str, Any]]:
    """Reconstruct `sparse_model`'s `targets` (full module names) in place against `dense_model`; returns
    one report per reconstructed block (losses before/after per unit and for the block output, seconds).

    `start_block` > 0 takes the blocks before it as already reconstructed (a resumed run); `on_block` is
    called after each block with its index, the sparse block and its report (a job saves it there).
    """
    runner = Reconstructor(dense_model, sparse_model, config, pattern, targets, device, progress)
    return runner.run(calibration_ids, start_block, on_block)
