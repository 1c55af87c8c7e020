"""MaskLLM as a training method: learn each layer's N:M mask by Gumbel-softmax, weights frozen.

Plugs into the shared loop (`semisparse.training`) through the `TrainingMethod` protocol. Only the mask
logits train (AdamW, β = (0.9, 0.95), no weight decay); the loss is the language-model cross-entropy
minus `λ_t Σ‖W ⊙ M̃‖²`, which rewards masks that keep large weights. `train_weights` (beyond the paper)
also trains the masked weights with a straight-through gradient, optionally with AST's distillation loss.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from semisparse import nm
from semisparse.data import calibration_ids, file_sha256
from semisparse.errors import SemisparseError
from semisparse.maskfiles import MASKS_FILE, load_masks, save_masks, target_shapes
from semisparse.maskllm.candidates import candidate_count
from semisparse.maskllm.prior import PRIOR_METHODS, one_shot_masks
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
from semisparse.models import context_length, find_targets, load_model, load_tokenizer
from semisparse.training.distill import distillation_loss
from semisparse.training.optim import adamw

FLIP_EVERY = 10


def _flag(name: str) -> str:
    """How a user sets a MaskLLM setting: `--set key=value` on `semisparse train maskllm` (or the recipe)."""
    return f"--set {name}=..."


@dataclass
class MaskLLMSettings:
    """MaskLLM's own knobs (METHODS.md §3); a flat dataclass so CLI flags and YAML recipes fill it."""

    pattern: str = "2:4"
    prior: str = "sparsegpt"  # sparsegpt | wanda | magnitude | none
    prior_mask: str | None = None  # a mask file used as the prior instead (transfer); overrides `prior`
    alpha: float = 3.0  # prior strength; 0 = no prior
    tau_start: float = 4.0
    tau_end: float = 0.05
    kappa_start: float = 1e2
    kappa_end: float = 5e2
    hard: bool = False
    reg_start: float = 1e-5
    reg_end: float = 0.0
    lr: float = 5e-4  # peak lr of the logits (the loop's schedule scales it)
    calibration: str = "c4"  # data for the sparsegpt / wanda prior
    calibration_nsamples: int = 128
    calibration_seqlen: int = 2048
    train_weights: bool = False  # joint mode: also train the kept weights (straight-through)
    weight_lr: float = 2e-5  # peak lr of the weights in joint mode
    distill: bool = False  # dense teacher: alpha_task · CE + alpha_kl · T² · KL instead of CE
    alpha_task: float = 1.0
    alpha_kl: float = 1.0
    temperature: float = 2.0

    def __post_init__(self) -> None:
        nm.parse_pattern(self.pattern)
        if self.prior not in PRIOR_METHODS:
            raise SemisparseError(f"unknown prior '{self.prior}': use one of {', '.join(PRIOR_METHODS)}")
        if self.prior_mask is not None and (not isinstance(self.prior_mask, str) or not self.prior_mask):
            raise SemisparseError(
                "prior_mask must be the path of a mask file (.npz); fix --set prior_mask=..."
            )
        for name in ("hard", "train_weights", "distill"):
            if not isinstance(getattr(self, name), bool):
                raise SemisparseError(f"{name} must be true or false (got {getattr(self, name)!r})")
        for name in ("tau_start", "tau_end", "kappa_start", "kappa_end", "lr", "weight_lr", "temperature"):
            self._check_number(name, positive=True)
        for name in ("alpha", "reg_start", "reg_end", "alpha_task", "alpha_kl"):
            self._check_number(name, positive=False)
        for name in ("calibration_nsamples", "calibration_seqlen"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise SemisparseError(f"{name} must be a positive integer (got {value!r}); fix {_flag(name)}")
        if not isinstance(self.calibration, str) or not self.calibration:
            raise SemisparseError(
                "calibration must name c4, wikipedia or a text file; fix --set calibration=..."
            )
        if self.distill and self.alpha_task == 0 and self.alpha_kl == 0:
            raise SemisparseError(
                "alpha_task and alpha_kl are both 0, so there is no loss: raise one of them"
            )

    def _check_number(self, name: str, positive: bool) -> None:
        value = getattr(self, name)
        ok = not isinstance(value, bool) and isinstance(value, int | float) and math.isfinite(value)
        if not ok or value < 0 or (positive and value == 0):
            bound = "positive" if positive else ">= 0"
            raise SemisparseError(f"{name} must be finite and {bound} (got {value!r}); fix {_flag(name)}")

    @property
    def nm_pattern(self) -> nm.NMPattern:
        return nm.parse_pattern(self.pattern)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MaskLLMSettings:
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise SemisparseError(
                f"unknown maskllm setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
            )
        return cls(**data)


def _check_steps(total_steps: int) -> None:
    if total_steps < 1:
        raise SemisparseError(f"total_steps must be at least 1 (got {total_steps}); raise the token budget")


def _linear(start: float, end: float, step: int, total_steps: int) -> float:
    """Linear from `start` at step 0 to `end` at the last step (`total_steps - 1`), then held."""
    progress = min(max(step, 0) / (total_steps - 1), 1.0) if total_steps > 1 else 1.0
    return start + (end - start) * progress


def _index_dtype(count: int) -> torch.dtype:
    return torch.uint8 if count <= 255 else torch.int32


class MaskLLMMethod:
    """The `TrainingMethod` for MaskLLM; build it with `from_pretrained`."""

    name = "maskllm"

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        settings: MaskLLMSettings,
        total_steps: int,
        prior_indices: dict[str, Tensor],
        prior_info: dict[str, Any],
        teacher: nn.Module | None = None,
        model_name: str = "",
    ) -> None:
        _check_steps(total_steps)
        self.model = model
        self.tokenizer = tokenizer
        self.settings = settings
        self.total_steps = total_steps
        self.prior_indices = prior_indices
        self.prior_info = prior_info
        self.teacher = teacher
        self.model_name = model_name
        self.layers = learnable_layers(model)
        if not self.layers:
            raise ValueError("the model has no learnable-mask layers: attach them first")
        self._schedule(0)

    @classmethod
    def from_pretrained(
        cls,
        model_name: str,
        settings: MaskLLMSettings,
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
            teacher = copy.deepcopy(model).requires_grad_(False).eval()
            if torch.device(device).type == "cuda":
                teacher = teacher.to(torch.bfloat16)
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
        """The logits (no weight decay); in joint mode also the masked weights at `weight_lr`."""
        groups: list[dict] = [
            {
                "params": [layer.logits for layer in self.layers.values()],
                "lr": self.settings.lr,
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

    def make_optimizer(self, groups: list[dict], config: Any = None) -> torch.optim.Optimizer:
        """AdamW with β = (0.9, 0.95) (the config's betas, which default to that); decay only on weights."""
        betas = tuple(getattr(config, "betas", (0.9, 0.95)))
        decay = getattr(config, "weight_decay", 0.0)
        for group in groups:
            group.setdefault("weight_decay", decay)
        return adamw(groups, lr=self.settings.lr, betas=betas, eps=getattr(config, "eps", 1e-8))

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
        batch = batch.to(device)
        logits = self.model(input_ids=batch, use_cache=False).logits
        settings, teacher_logits = self.settings, None
        alpha_task, alpha_kl = (settings.alpha_task, settings.alpha_kl) if settings.distill else (1.0, 0.0)
        if settings.distill and self.teacher is not None:
            with torch.no_grad():
                teacher_logits = self.teacher(input_ids=batch, use_cache=False).logits
        task, metrics = distillation_loss(
            logits, teacher_logits, batch, alpha_task, alpha_kl, settings.temperature
        )
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
    settings: MaskLLMSettings,
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
    ids, calibration = None, None
    if settings.prior != "magnitude":
        context = context_length(model)
        if settings.calibration_seqlen > context:
            raise SemisparseError(
                f"calibration_seqlen {settings.calibration_seqlen} exceeds the model's context of {context}; "
                f"set calibration_seqlen to {context} or less"
            )
        ids, calibration = calibration_ids(
            tokenizer, settings.calibration, settings.calibration_nsamples, settings.calibration_seqlen, seed
        )
    masks = one_shot_masks(model, settings.prior, pattern, ids, device=device, progress=progress)
    return masks, {"source": settings.prior, "calibration": calibration}
