"""The contract between a training method (dense, AST, MaskLLM) and the shared loop, as base classes.

`TrainingMethod` is what the loop drives; `MethodConfig` is the typed config of a method, registered with
it (`semisparse.registry.register("trainer", name, Config)`), which also states the facts the recipe
loader needs: the training defaults that differ for this method and what the run's `lr` applies to.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from semisparse.settings import Settings
from semisparse.training.optim import adamw

if TYPE_CHECKING:
    from semisparse.training.config import TrainConfig


def default_optimizer(groups: list[dict[str, Any]], config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW with the config's lr, betas, eps and weight decay (a group's own values take precedence)."""
    return adamw(
        groups, lr=config.lr, betas=tuple(config.betas), eps=config.eps, weight_decay=config.weight_decay
    )


@dataclass
class MethodConfig(Settings):
    """Base of a trainer's config (the `method:` section of a recipe, `--set` on the command line).

    Two facts about the method, as class variables rather than settings:
    `train_defaults`: `TrainConfig` values that differ for this method; a recipe and explicit values
    still override them. `lr_target`: what the run's `lr` is the peak learning rate of, i.e. the method's
    main trained parameters (other parameter groups may carry their own lr, scaled by the same schedule).
    """

    owner: ClassVar[str] = "method"
    train_defaults: ClassVar[Mapping[str, Any]] = {}
    lr_target: ClassVar[str] = "all trained weights"


class TrainingMethod:
    """What a method gives the shared loop (`semisparse.training.loop`); subclass it and override `loss`.

    Construction: `from_pretrained(model_name, config, total_steps, device, seed=0, initialise=True,
    progress=True)` builds the method on `device` for a run of `total_steps` optimizer steps;
    `initialise=False` skips set-up whose result a checkpoint restores anyway (pruning, calibration, a
    prior), so resuming is fast. The loop builds a method a second time, on the CPU, to export a run
    trained with FSDP.

    Attributes: `name`, the registered trainer name (recorded in checkpoints and `semisparse.json`);
    `model`, the module the loop trains, evaluates and checkpoints (its `state_dict` is the model part of
    a checkpoint); `tokenizer`, saved with the exported model (None: the loop loads the base model's).

    Per optimizer step `s` (0-based) the loop calls `before_step(s)`, then `loss(batch, s)` for each
    micro-batch (token ids [micro_batch, seq_len] on the model's device, under autocast; the loss is
    backpropagated divided by `grad_accum`), averages gradients over processes, clips, and only when the
    loss and gradient norm are finite steps the optimizer and calls `after_step(s)`. The metric dicts that
    `before_step`, `loss` and `after_step` return are written to metrics.jsonl.

    Optimizer: `make_optimizer(parameter_groups(), config)`; the loop wraps it in the warm-up + cosine
    schedule, which scales every group's lr. `config.lr` is the peak lr of the method's main trained
    parameters (`MethodConfig.lr_target`); a group may set its own `lr` and `weight_decay`.

    Checkpoints: `state_dict()` is what the method needs beyond the model and optimizer state (tensors
    and plain Python values only, loaded with `weights_only=True`); `load_state_dict(state)` restores it
    into a method built with `initialise=False`, after the model state was loaded.

    Export: `export(out_tmp_dir)` writes the final model into the directory (plain transformers layout)
    and returns the metadata for `semisparse.json` (`method` and `base_model` are filled in when absent).
    It runs once, at the end; it may change the model in place.
    """

    name: ClassVar[str] = "method"
    model: nn.Module
    tokenizer: Any = None

    @classmethod
    def from_pretrained(
        cls,
        model_name: str,
        config: Any,
        total_steps: int,
        device: str,
        seed: int = 0,
        initialise: bool = True,
        progress: bool = True,
    ) -> TrainingMethod:
        raise NotImplementedError(f"{cls.__name__} does not define from_pretrained")

    def parameter_groups(self) -> list[dict[str, Any]]:
        """All trainable parameters in one group with the run's lr and weight decay."""
        return [{"params": [param for param in self.model.parameters() if param.requires_grad]}]

    def make_optimizer(self, groups: list[dict[str, Any]], config: TrainConfig) -> torch.optim.Optimizer:
        return default_optimizer(groups, config)

    def loss(self, batch: torch.Tensor, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError(f"{type(self).__name__} does not define loss")

    def before_step(self, step: int) -> dict[str, float]:
        return {}

    def after_step(self, step: int) -> dict[str, float]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        return None

    def export(self, out_tmp_dir: Path) -> dict[str, Any]:
        """Save the model (and tokenizer) as they are."""
        self.model.save_pretrained(out_tmp_dir, safe_serialization=True)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(out_tmp_dir)
        return {"method": self.name}
