"""AST, the Adaptive Sparse Trainer (`../shared/METHODS.md` §2), as a method of the shared training loop.

The student starts from the dense model with an initial N:M mask (any registered pruner, or a pruned
checkpoint), computes with the masked weights and trains all of them (straight-through), is pulled
towards its dense teacher by distillation, has its pruned weights decayed by annealed SR-STE, and
recomputes its mask every Δt steps. SLoRB optionally adds a small dense branch per layer.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from semisparse import nm, registry
from semisparse.calibration import load_calibration
from semisparse.errors import SemisparseError
from semisparse.maskfiles import MASKS_FILE, save_masks, to_parameter_layout
from semisparse.methods.common import calibration_of, calibration_settings
from semisparse.models import load_model, load_tokenizer
from semisparse.modules import GlobFilter, find_targets, layer_filter, set_weight_matrix, weight_matrix
from semisparse.nm import NMPattern
from semisparse.pruning import calibrate_and_prune, pruner_config
from semisparse.pruning.magnitude import magnitude_mask
from semisparse.registry import Technique, register
from semisparse.settings import setting
from semisparse.sparse import SLoRBConfig, densify, save_slorb, slorb_overhead, sparsify
from semisparse.training.adaptive_mask import MaskUpdater, collect_input_norms
from semisparse.training.distill import Distiller, Teacher
from semisparse.training.method import MethodConfig, TrainingMethod
from semisparse.training.srste import SRSTEAdamW, annealed_decay

# The paper's GPT-2 schedule ramps the decay over the first quarter of training (T0 = 10k of 40k steps).
_DEFAULT_DECAY_WARMUP_FRACTION = 0.25


@dataclass
class ASTConfig(MethodConfig):
    """AST's own settings (the `method:` section of a training recipe); checked on creation.

    `init`: the initial mask, from a registered pruner (magnitude needs no data; wanda/sparsegpt read
    `calibration`, `calibration_nsamples` x `calibration_seqlen` tokens) or the path of a model pruned to
    `pattern`. `mask_update_every` (Δt, 0 = fixed mask) and `mask_score` drive the adaptive mask.
    `decay_lambda` is SR-STE's λ, reached linearly after `decay_warmup_steps` (T0; default a quarter of
    the steps). The loss is `alpha_task` · CE + `alpha_kl` · T² · KL at `temperature` T, plus `layerwise`
    times the block-output term; the frozen `teacher` defaults to the model itself and is not loaded when
    both `alpha_kl` and `layerwise` are 0. `slorb*` add the SLoRB branch; `slorb_init="auto"` becomes the
    paper's "mean" when the kept weights are the dense ones (a pruner that does not update the weights it
    keeps, e.g. magnitude or Wanda) and "zeros" when they were already compensated (SparseGPT, or a pruned
    directory), where "mean" measured worse (`benchmarks/results/slorb_init_smollm2_cpu.md`).
    `keep_slorb` exports SLoRB beside the model instead of dropping it. `include` / `exclude` select the
    layers as in `semisparse prune`.
    """

    owner: ClassVar[str] = "ast"

    pattern: str = setting("2:4", "N:M sparsity pattern of the trained model")
    init: str = setting(
        "magnitude", "initial mask: a registered pruner (e.g. magnitude, wanda) or a pruned model's directory"
    )
    mask_update_every: int = setting(
        10, "Δt: recompute the masks every Δt optimizer steps, 0 = fixed", minimum=0
    )
    mask_score: Literal["magnitude", "wanda"] = setting(
        "magnitude", "score of the mask updates; wanda weighs |W| by calibration input norms"
    )
    decay_lambda: float = setting(1e-4, "SR-STE's λ: decay of the pruned weights after the ramp", minimum=0)
    decay_warmup_steps: int | None = setting(
        None, "T0: steps of the linear λ ramp (none: a quarter of the run)", minimum=0
    )
    alpha_task: float = setting(0.33, "weight of the cross-entropy term", minimum=0)
    alpha_kl: float = setting(0.67, "weight of the distillation term T²·KL(teacher ‖ student)", minimum=0)
    temperature: float = setting(2.0, "distillation temperature T", above=0)
    layerwise: float = setting(0.0, "weight of the block-output distillation term", minimum=0)
    slorb: bool = setting(False, "add a SLoRB branch (dense, low-rank) to every sparse layer")
    slorb_k: int = setting(16, "SLoRB group size k: inputs per shared scale", minimum=1)
    slorb_init: Literal["auto", "mean", "sum", "zeros"] = setting(
        "auto", "how SLoRB's scales start; auto: mean for dense kept weights, zeros after compensation"
    )
    slorb_train_projection: bool = setting(True, "also train SLoRB's 0/1 projection")
    keep_slorb: bool = setting(False, "export the SLoRB branch beside the model instead of dropping it")
    teacher: str | None = setting(None, "dense teacher model (none: the model being trained)")
    calibration: str = setting(
        "c4", "calibration data of the init pruner and the wanda score: c4, wikipedia or a text file"
    )
    calibration_nsamples: int = setting(128, "calibration windows", minimum=1)
    calibration_seqlen: int = setting(2048, "tokens per calibration window", minimum=1)
    include: list[str] = setting([], "only train these layers sparse (fnmatch globs on module names)")
    exclude: list[str] = setting([], "keep these layers dense (fnmatch globs on module names)")

    def check(self) -> None:
        nm.parse_pattern(self.pattern)
        pruners = registry.names("pruner")
        if self.init not in pruners and not Path(self.init).expanduser().is_dir():
            raise SemisparseError(
                f"AST `init` '{self.init}' is neither {', '.join(pruners)} nor an existing directory: "
                "pick a pruner or pass the path of a model saved by the prune command"
            )
        if self.alpha_task == 0 and self.alpha_kl == 0:
            raise SemisparseError(
                "AST `alpha_task` and `alpha_kl` are both 0, so nothing is trained: set at least one above 0"
            )
        if self.slorb_init == "auto":
            pruner = self.init_pruner
            self.slorb_init = "mean" if pruner is not None and not pruner.updates_kept_weights else "zeros"
        if self.keep_slorb and not self.slorb:
            raise SemisparseError("AST `keep_slorb` needs `slorb`: enable slorb or drop keep_slorb")

    @property
    def nm_pattern(self) -> NMPattern:
        return nm.parse_pattern(self.pattern)

    @property
    def init_pruner(self) -> Technique | None:
        """The registry entry of the initial pruner; None when `init` is a pruned model's directory."""
        return registry.lookup("pruner", self.init) if self.init in registry.names("pruner") else None

    @property
    def filter_fn(self) -> GlobFilter:
        """The layers AST trains sparse, from `include` / `exclude`."""
        return layer_filter(self.include, self.exclude)

    def slorb_config(self, init: str | None = None) -> SLoRBConfig | None:
        if not self.slorb:
            return None
        return SLoRBConfig(self.slorb_k, init or self.slorb_init, self.slorb_train_projection)

    @property
    def needs_teacher(self) -> bool:
        return self.alpha_kl > 0 or self.layerwise > 0


def _masks_from_zeros(model: nn.Module, settings: ASTConfig, source: str) -> dict[str, Tensor]:
    """Keep-masks of an already pruned model: its nonzeros (exactly N per group, ties to lower index)."""
    pattern = settings.nm_pattern
    masks = {}
    for name, module in find_targets(model, settings.filter_fn, m=pattern.m).items():
        weight = weight_matrix(module)
        if not nm.is_nm(weight, pattern.n, pattern.m):
            raise SemisparseError(
                f"layer {name} of {source} is not {pattern} sparse: prune it to {pattern} first, "
                f"or set `init` to a pruner ({', '.join(registry.names('pruner'))})"
            )
        masks[name] = magnitude_mask(weight, pattern, None)
    return masks


def _dense_target_weights(model: nn.Module, settings: ASTConfig) -> dict[str, Tensor]:
    """CPU copies of the targets' [out, in] weights, taken before pruning overwrites them."""
    targets = find_targets(model, settings.filter_fn, m=settings.nm_pattern.m)
    return {name: weight_matrix(module).detach().to("cpu", copy=True) for name, module in targets.items()}


def _initial_student(
    model_name: str, settings: ASTConfig, tokenizer: Any, device: str, seed: int, progress: bool
) -> tuple[nn.Module, dict[str, Tensor], dict[str, Tensor] | None, dict[str, Any]]:
    """The student before the swap, its initial masks, the dense weights for SLoRB's init, and provenance.

    A pruner that leaves the kept weights untouched (magnitude, Wanda) only chooses the mask, so the
    student keeps all its dense weights (pruned ones can come back, as in the paper). A pruner that
    updates the kept weights assuming the pruned ones are zero (SparseGPT) is trusted: the student starts
    from its output, pruned entries zero.
    """
    want_dense = settings.slorb and settings.slorb_init != "zeros"
    pruner = settings.init_pruner
    if pruner is None:
        student = load_model(settings.init, device=device)
        dense = _dense_target_weights(load_model(model_name), settings) if want_dense else None
        masks = _masks_from_zeros(student, settings, settings.init)
        if dense is not None:
            for name, mask in masks.items():
                if dense[name].shape != mask.shape:
                    raise SemisparseError(
                        f"{settings.init} does not fit {model_name} (layer {name}): "
                        "use the model it was pruned from"
                    )
        return student, masks, dense, {"init": "pruned_model", "path": str(settings.init)}

    student = load_model(model_name, device=device)
    dense = _dense_target_weights(student, settings)
    config = pruner_config(pruner.name, pattern=settings.pattern)
    with calibration_settings():
        _, calibration_info = calibrate_and_prune(
            student,
            tokenizer,
            config,
            calibration_of(settings, seed),
            filter_fn=settings.filter_fn,
            device=device,
            progress=progress,
        )
    masks = _masks_from_zeros(student, settings, f"the {pruner.name}-pruned model")
    if not pruner.updates_kept_weights:
        for name, module in find_targets(student, settings.filter_fn).items():
            set_weight_matrix(module, dense[name].to(weight_matrix(module).device))
    return (
        student,
        masks,
        dense if want_dense else None,
        {"init": pruner.name, "calibration": calibration_info},
    )


@register(
    "trainer",
    "ast",
    ASTConfig,
    summary="AST: 2:4 retraining with adaptive masks, distillation, annealed SR-STE and optional SLoRB.",
)
class ASTMethod(TrainingMethod):
    """AST for the shared training loop."""

    name = "ast"

    def __init__(
        self,
        model: nn.Module,
        teacher: Teacher | None,
        tokenizer: Any,
        settings: ASTConfig,
        updater: MaskUpdater,
        total_steps: int,
        device: str,
        provenance: dict[str, Any],
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.settings = settings
        self.distiller = Distiller(
            teacher, settings.alpha_task, settings.alpha_kl, settings.temperature, settings.layerwise
        )
        self.updater = updater
        self.layers = updater.layers
        self.device = torch.device(device)
        self.decay_warmup_steps = (
            settings.decay_warmup_steps
            if settings.decay_warmup_steps is not None
            else round(_DEFAULT_DECAY_WARMUP_FRACTION * total_steps)
        )
        self.provenance = provenance
        self.optimizer: SRSTEAdamW | None = None

    @property
    def teacher(self) -> Teacher | None:
        return self.distiller.teacher

    @classmethod
    def from_pretrained(
        cls,
        model_name: str,
        settings: ASTConfig,
        total_steps: int,
        device: str,
        seed: int = 0,
        initialise: bool = True,
        progress: bool = True,
    ) -> ASTMethod:
        """Student with its initial mask swapped in, teacher, and mask updater.

        `initialise=False` skips pruning and calibration (a checkpoint restores weights, masks and state).
        """
        if total_steps < 1:
            raise SemisparseError(
                f"AST needs at least one optimizer step (total_steps={total_steps}): raise `tokens`"
            )
        teacher_name = settings.teacher or model_name
        if settings.needs_teacher:
            Teacher.check_source(teacher_name)
        tokenizer = load_tokenizer(model_name)
        if initialise:
            student, masks, dense, provenance = _initial_student(
                model_name, settings, tokenizer, device, seed, progress
            )
            slorb = settings.slorb_config()
        else:
            student, masks, dense, provenance = load_model(model_name, device=device), None, None, {}
            slorb = settings.slorb_config(init="zeros")
        layers = sparsify(
            student,
            masks,
            settings.nm_pattern,
            settings.include,
            settings.exclude,
            slorb,
            slorb_weights=dense,
        )
        norms = None
        if settings.mask_score == "wanda":
            if initialise:
                with calibration_settings():
                    ids, info = load_calibration(student, tokenizer, calibration_of(settings, seed))
                norms = collect_input_norms(student, layers, ids)
                provenance["mask_score_calibration"] = info
            else:
                norms = {
                    name: torch.zeros(layer.in_features, device=layer.weight.device)
                    for name, layer in layers.items()
                }
        updater = MaskUpdater(layers, settings.nm_pattern, settings.mask_score, norms)
        teacher = Teacher.from_model(teacher_name, student, device) if settings.needs_teacher else None
        provenance["teacher"] = teacher_name if teacher is not None else None
        student.train()
        return cls(student, teacher, tokenizer, settings, updater, total_steps, device, provenance)

    def parameter_groups(self) -> list[dict]:
        """Matrices get weight decay; vectors (norms, biases) and SLoRB's 0/1 projection do not."""
        decay, no_decay = [], []
        for name, param in self.model.named_parameters():
            if param.requires_grad:
                (decay if param.dim() >= 2 and not name.endswith(".slorb.X") else no_decay).append(param)
        return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]

    def make_optimizer(self, groups: list[dict], config: Any) -> SRSTEAdamW:
        masks = {layer.weight: layer.mask for layer in self.layers.values()}
        self.optimizer = SRSTEAdamW(
            groups,
            masks,
            lr=config.lr,
            betas=tuple(config.betas),
            eps=config.eps,
            weight_decay=config.weight_decay,
        )
        return self.optimizer

    def decay_at(self, step: int) -> float:
        return annealed_decay(step, self.settings.decay_lambda, self.decay_warmup_steps)

    def before_step(self, step: int) -> dict[str, float]:
        """Set `λ_t` for the step about to be taken (`step` = optimizer steps done before it)."""
        lam = self.decay_at(step)
        if self.optimizer is not None:
            self.optimizer.set_decay(lam)
        return {"decay_lambda": lam}

    def loss(self, batch: Tensor, step: int) -> tuple[Tensor, dict[str, float]]:
        return self.distiller.loss(self.model, batch.to(self.device))

    def after_step(self, step: int) -> dict[str, float]:
        """Recompute the masks after every Δt-th optimizer step (`step` as in `before_step`)."""
        every = self.settings.mask_update_every
        if every and (step + 1) % every == 0:
            return self.updater.update()
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {"mask_updater": self.updater.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.updater.load_state_dict(state["mask_updater"])

    def export(self, out_tmp_dir: Path) -> dict[str, Any]:
        """Write the final model into `out_tmp_dir`: plain-transformers weights with zeros, the tokenizer,
        the masks (`masks.npz`, the shared mask-file format), and the SLoRB branches when kept. The
        student is densified in place, so this ends training."""
        out = Path(out_tmp_dir)
        masks = {name: layer.mask.detach().cpu() for name, layer in self.layers.items()}
        initial = {name: mask.cpu() for name, mask in self.updater.initial.items()}
        overhead = slorb_overhead(self.model) if self.settings.slorb else None
        tensors = densify(self.model, keep_slorb=self.settings.keep_slorb)
        self.model.save_pretrained(out, safe_serialization=True)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(out)
        save_masks(
            {
                f"{name}.weight": to_parameter_layout(self.model.get_submodule(name), mask)
                for name, mask in masks.items()
            },
            out / MASKS_FILE,
        )
        if tensors:
            save_slorb(tensors, out)
        total = sum(mask.numel() for mask in masks.values())
        return {
            "method": self.name,
            "pattern": self.settings.pattern,
            "targets": list(masks),
            "per_layer_sparsity": {name: 1.0 - mask.float().mean().item() for name, mask in masks.items()},
            "overall_sparsity": 1.0 - sum(int(mask.sum()) for mask in masks.values()) / total,
            "flip_rate_initial": sum(int((masks[n] != initial[n]).sum()) for n in masks) / total,
            "slorb": overhead,
            "slorb_kept": bool(tensors),
            "initial_mask": self.provenance,
            "decay_warmup_steps": self.decay_warmup_steps,
            "settings": self.settings.to_dict(),
        }
