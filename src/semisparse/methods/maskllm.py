"""MaskLLM as a training method: learn each layer's N:M mask by Gumbel-softmax, weights frozen.

Plugs into the shared loop (`semisparse.training`) as a `TrainingMethod`. Only the mask logits train
(AdamW, β = (0.9, 0.95), no weight decay, at the run's `lr`); the loss is the language-model cross-entropy
minus `λ_t Σ‖W ⊙ M̃‖²`, which rewards masks that keep large weights. `train_weights` (beyond the paper)
also trains the masked weights with a straight-through gradient, optionally with AST's distillation loss.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from semisparse import nm, registry
from semisparse.data import file_sha256
from semisparse.errors import SemisparseError
from semisparse.maskfiles import MASKS_FILE, load_masks, save_masks, target_shapes
from semisparse.maskllm.candidates import candidate_count
from semisparse.maskllm.prior import one_shot_masks
from semisparse.maskllm.swap import (
    attach_learnable_masks,
    candidate_indices,
    detach_learnable_masks,
    final_masks,
    flip_fraction,
    learnable_layers,
    mask_candidates,
    mean_max_probability,
    memory_per_weight,
    reattach,
    regulariser,
    set_schedule,
)
from semisparse.methods.common import calibration_of, calibration_settings
from semisparse.models import load_model, load_tokenizer
from semisparse.modules import find_targets
from semisparse.pruning import pruner_config
from semisparse.registry import register
from semisparse.settings import setting
from semisparse.training.distill import Distiller, Teacher
from semisparse.training.method import MethodConfig, TrainingMethod
from semisparse.training.optim import adamw

FLIP_EVERY = 10


@dataclass
class MaskLLMConfig(MethodConfig):
    """MaskLLM's own knobs (`../shared/METHODS.md` §3), the `method:` section of a recipe.

    The run's `lr` is the peak lr of the mask logits (their AdamW group; MaskLLM trains them without
    warm-up at 5e-4 by default); `weight_lr` is that of the kept weights in joint mode (`train_weights`).
    """

    owner: ClassVar[str] = "maskllm"
    train_defaults: ClassVar[Mapping[str, Any]] = {"warmup_steps": 0, "lr": 5e-4}
    lr_target: ClassVar[str] = "the mask logits"

    pattern: str = setting("2:4", "N:M pattern of the learned masks")
    prior: str = setting("sparsegpt", "one-shot pruner the logits start from (a registered pruner) or none")
    prior_mask: str | None = setting(
        None, "mask file (.npz) to start from instead (transfer); overrides prior"
    )
    alpha: float = setting(3.0, "prior strength: logit shift in units of their std; 0 = no prior", minimum=0)
    tau_start: float = setting(4.0, "Gumbel-softmax temperature τ at the first step", above=0)
    tau_end: float = setting(0.05, "τ at the last step (linear in between)", above=0)
    kappa_start: float = setting(1e2, "logit scale κ at the first step", above=0)
    kappa_end: float = setting(5e2, "κ at the last step (linear in between)", above=0)
    hard: bool = setting(False, "forward one-hot samples with the soft gradient (straight-through)")
    reg_start: float = setting(
        1e-5, "weight λ of the kept-weight reward ‖W ⊙ M̃‖² at the first step", minimum=0
    )
    reg_end: float = setting(0.0, "λ at the last step (linear in between)", minimum=0)
    calibration: str = setting(
        "c4", "calibration data of a prior that reads data: c4, wikipedia or a text file"
    )
    calibration_nsamples: int = setting(128, "calibration windows of the prior", minimum=1)
    calibration_seqlen: int = setting(2048, "tokens per calibration window of the prior", minimum=1)
    train_weights: bool = setting(False, "joint mode: also train the kept weights (straight-through)")
    weight_lr: float = setting(2e-5, "peak lr of the weights in joint mode", above=0)
    distill: bool = setting(False, "dense teacher: alpha_task · CE + alpha_kl · T² · KL instead of CE")
    alpha_task: float = setting(1.0, "weight of the cross-entropy term when distilling", minimum=0)
    alpha_kl: float = setting(1.0, "weight of the KL term when distilling", minimum=0)
    temperature: float = setting(2.0, "distillation temperature T", above=0)

    def check(self) -> None:
        nm.parse_pattern(self.pattern)
        priors = ["none", *registry.names("pruner")]
        if self.prior not in priors:
            raise SemisparseError(f"unknown prior '{self.prior}': use one of {', '.join(priors)}")
        if not self.calibration:
            raise SemisparseError("`calibration` must name c4, wikipedia or a text file")
        if self.distill and self.alpha_task == 0 and self.alpha_kl == 0:
            raise SemisparseError(
                "`alpha_task` and `alpha_kl` are both 0, so there is no loss: raise one of them"
            )

    @property
    def nm_pattern(self) -> nm.NMPattern:
        return nm.parse_pattern(self.pattern)


def _check_steps(total_steps: int) -> None:
    if total_steps < 1:
        raise SemisparseError(f"total_steps must be at least 1 (got {total_steps}); raise `tokens`")


def _linear(start: float, end: float, step: int, total_steps: int) -> float:
    """Linear from `start` at step 0 to `end` at the last step (`total_steps - 1`), then held."""
    progress = min(max(step, 0) / (total_steps - 1), 1.0) if total_steps > 1 else 1.0
    return start + (end - start) * progress


def _index_dtype(count: int) -> torch.dtype:
    return torch.uint8 if count <= 255 else torch.int32


@register(
    "trainer",
    "maskllm",
    MaskLLMConfig,
    summary="MaskLLM: learn N:M masks of a frozen model with Gumbel-softmax from a one-shot prior.",
)
class MaskLLMMethod(TrainingMethod):
    """The `TrainingMethod` for MaskLLM; build it with `from_pretrained`."""

    name = "maskllm"

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        settings: MaskLLMConfig,
        total_steps: int,
        prior_indices: dict[str, Tensor],
        prior_info: dict[str, Any],
        teacher: Teacher | None = None,
        model_name: str = "",
    ) -> None:
        _check_steps(total_steps)
        self.model = model
        self.tokenizer = tokenizer
        self.settings = settings
        self.total_steps = total_steps
        self.prior_indices = prior_indices
        self.prior_info = prior_info
        if settings.distill:
            self.distiller = Distiller(teacher, settings.alpha_task, settings.alpha_kl, settings.temperature)
        else:
            self.distiller = Distiller(None, 1.0, 0.0, settings.temperature)
        self.model_name = model_name
        self.layers = learnable_layers(model)
        if not self.layers:
            raise ValueError("the model has no learnable-mask layers: attach them first")
        self._reg_lambda = 0.0
        self._schedule(0)

    @property
    def teacher(self) -> Teacher | None:
        return self.distiller.teacher

    @classmethod
    def from_pretrained(
        cls,
        model_name: str,
        settings: MaskLLMConfig,
        total_steps: int,
        device: str | torch.device,
        seed: int = 0,
        initialise: bool = True,
        progress: bool = True,
    ) -> MaskLLMMethod:
        """Load the dense model, compute the prior mask and attach learnable masks.

        `initialise=False` skips the prior (possibly a slow SparseGPT pass): the caller will load a
        checkpoint holding the logits (model state) and the prior's candidates (`load_state_dict`).
        """
        _check_steps(total_steps)
        pattern = settings.nm_pattern
        model = load_model(model_name, device=device)
        tokenizer = load_tokenizer(model_name)
        find_targets(model, m=pattern.m)
        prior_masks, prior_info = None, {"source": "none"}
        if initialise:
            prior_masks, prior_info = _prior_masks(model, tokenizer, settings, device, seed, progress)
        teacher = None
        if settings.distill and settings.alpha_kl > 0:
            teacher = Teacher.from_model(model, device=device)
        alpha = settings.alpha if prior_masks is not None else 0.0
        layers = attach_learnable_masks(model, pattern, prior_masks, alpha=alpha, seed=seed)
        model.requires_grad_(False)
        for layer in layers.values():
            layer.logits.requires_grad_(True)
            layer.weight.requires_grad_(settings.train_weights)
        index_dtype = _index_dtype(candidate_count(pattern))
        # Without a prior, "flips" are counted against the initial (random) argmax candidates.
        reference = candidate_indices(model) if prior_masks is None else mask_candidates(model, prior_masks)
        prior_indices = {name: index.to(index_dtype) for name, index in reference.items()}
        return cls(model, tokenizer, settings, total_steps, prior_indices, prior_info, teacher, model_name)

    # --- TrainingMethod -----------------------------------------------------------------------------
    def parameter_groups(self) -> list[dict]:
        """The logits at the run's lr (no weight decay); in joint mode also the masked weights at
        `weight_lr`."""
        groups: list[dict] = [
            {
                "params": [layer.logits for layer in self.layers.values()],
                "weight_decay": 0.0,
                "name": "logits",
            }
        ]
        if self.settings.train_weights:
            groups.append(
                {
                    "params": [layer.weight for layer in self.layers.values()],
                    "lr": self.settings.weight_lr,
                    "name": "weights",
                }
            )
        return groups

    def make_optimizer(self, groups: list[dict], config: Any) -> torch.optim.Optimizer:
        """AdamW at the run's lr with its betas (β = (0.9, 0.95) by default); decay only on the weights."""
        for group in groups:
            group.setdefault("weight_decay", config.weight_decay)
        return adamw(groups, lr=config.lr, betas=tuple(config.betas), eps=config.eps)

    def schedule(self, step: int) -> dict[str, float]:
        """τ, κ and λ of the regulariser at `step` (0-based optimizer step), linear over the run."""
        s = self.settings
        return {
            "tau": _linear(s.tau_start, s.tau_end, step, self.total_steps),
            "kappa": _linear(s.kappa_start, s.kappa_end, step, self.total_steps),
            "reg_lambda": _linear(s.reg_start, s.reg_end, step, self.total_steps),
        }

    def _schedule(self, step: int) -> dict[str, float]:
        values = self.schedule(step)
        set_schedule(self.model, values["tau"], values["kappa"], self.settings.hard)
        self._reg_lambda = values["reg_lambda"]
        return values

    def before_step(self, step: int) -> dict[str, float]:
        return self._schedule(step)

    def loss(self, batch: Tensor, step: int) -> tuple[Tensor, dict[str, float]]:
        """CE (or the distillation loss) of the sampled-mask model minus λ·‖W ⊙ M̃‖²."""
        self._schedule(step)
        device = self.layers[next(iter(self.layers))].logits.device
        task, metrics = self.distiller.loss(self.model, batch.to(device))
        reg = regulariser(self.model)
        loss = task - self._reg_lambda * reg
        metrics.update({"regulariser": reg.item(), "loss": loss.item()})
        return loss, metrics

    def after_step(self, step: int) -> dict[str, float]:
        """Schedules plus how decided the masks are and, every `FLIP_EVERY` steps and at the last step,
        how far they moved from the prior (an argmax over all logits: ~6% of a CPU step if done each step).
        """
        values = self.schedule(step)
        values["mean_max_prob"] = mean_max_probability(self.model)
        if (step + 1) % FLIP_EVERY == 0 or step + 1 >= self.total_steps:
            values["flip_vs_prior"] = flip_fraction(self.model, self.prior_indices)
        return values

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint needs beyond the model state (which holds the logits): the prior's candidates."""
        return {
            "prior_indices": {name: index.cpu() for name, index in self.prior_indices.items()},
            "prior_info": self.prior_info,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        indices = state.get("prior_indices")
        if not isinstance(indices, dict) or set(indices) != set(self.layers):
            raise SemisparseError(
                "the checkpoint's MaskLLM state does not match this model's layers; resume the same run"
            )
        for name, index in indices.items():
            expected = tuple(self.layers[name].logits.shape[:2])
            if tuple(index.shape) != expected:
                raise SemisparseError(
                    f"the checkpoint's prior for {name} has shape {tuple(index.shape)}, not {expected}; "
                    "resume the same run"
                )
        self.prior_indices = {
            name: index.to(self.layers[name].logits.device) for name, index in indices.items()
        }
        self.prior_info = dict(state.get("prior_info", {}))

    def export(self, out_tmp_dir: Path) -> dict[str, Any]:
        """Write the argmax-masked model (plain transformers), its tokenizer and `masks.npz` into the dir."""
        out_tmp_dir = Path(out_tmp_dir)
        masks = final_masks(self.model)
        flips = flip_fraction(self.model, self.prior_indices)
        memory = memory_per_weight(self.model, self.settings.train_weights)
        layers = detach_learnable_masks(self.model)
        try:
            self.model.save_pretrained(out_tmp_dir, safe_serialization=True)
        finally:
            reattach(self.model, layers)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(out_tmp_dir)
        save_masks(masks, out_tmp_dir / MASKS_FILE)
        per_layer = {name[: -len(".weight")]: 1 - float(mask.float().mean()) for name, mask in masks.items()}
        total = sum(mask.numel() for mask in masks.values())
        return {
            "method": self.name,
            **({"base_model": self.model_name} if self.model_name else {}),
            "pattern": self.settings.pattern,
            "targets": list(per_layer),
            "include": [],
            "exclude": [],
            "overall_sparsity": sum(int((~mask).sum()) for mask in masks.values()) / total,
            "per_layer_sparsity": per_layer,
            "prior": self.prior_info,
            "flip_vs_prior": flips,
            "masks_file": MASKS_FILE,
            "masks_sha256": file_sha256(out_tmp_dir / MASKS_FILE),
            "mask_memory_bytes_per_weight": memory,
            "settings": self.settings.to_dict(),
        }


def _prior_masks(
    model: nn.Module,
    tokenizer: Any,
    settings: MaskLLMConfig,
    device: str | torch.device,
    seed: int,
    progress: bool,
) -> tuple[dict[str, Tensor] | None, dict[str, Any]]:
    """The prior's masks (param layout) and where they came from; (None, ...) without a prior."""
    pattern = settings.nm_pattern
    if settings.prior_mask is not None:
        path = Path(settings.prior_mask).expanduser()
        masks = load_masks(path, target_shapes(model, pattern))
        return masks, {"source": "mask_file", "path": str(path), "sha256": file_sha256(path)}
    if settings.prior == "none" or settings.alpha == 0:
        return None, {"source": "none"}
    config = pruner_config(settings.prior, pattern=settings.pattern)
    with calibration_settings():
        masks, calibration = one_shot_masks(
            model, tokenizer, config, calibration_of(settings, seed), device=device, progress=progress
        )
    return masks, {"source": settings.prior, "calibration": calibration}
