"""AST, the Adaptive Sparse Trainer (METHODS.md §2), as a method of the shared training loop.

The student starts from the dense model with an initial N:M mask (magnitude, Wanda, SparseGPT or a pruned
checkpoint), computes with the masked weights and trains all of them (straight-through), is pulled
towards its dense teacher by distillation, has its pruned weights decayed by annealed SR-STE, and
recomputes its mask every Δt steps. SLoRB optionally adds a small dense branch per layer.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import torch
from torch import Tensor, nn

from semisparse import nm
from semisparse.data import calibration_ids
from semisparse.errors import SemisparseError
from semisparse.maskfiles import MASKS_FILE, save_masks, to_parameter_layout
from semisparse.models import context_length, find_targets, load_model, load_tokenizer, resolve_model_path
from semisparse.models import weight_matrix as module_weight
from semisparse.nm import NMPattern
from semisparse.pruning import prune
from semisparse.pruning.magnitude import magnitude_mask
from semisparse.sparse import SLoRBConfig, densify, save_slorb, slorb_overhead, sparsify
from semisparse.sparse.slorb import SLORB_INITS
from semisparse.training.adaptive_mask import MASK_SCORES, MaskUpdater, collect_input_norms
from semisparse.training.distill import distillation_loss, layerwise_loss
from semisparse.training.srste import SRSTEAdamW, annealed_decay

INIT_PRUNERS: tuple[str, ...] = ("magnitude", "wanda", "sparsegpt")
# The paper's GPT-2 schedule ramps the decay over the first quarter of training (T0 = 10k of 40k steps).
_DEFAULT_DECAY_WARMUP_FRACTION = 0.25


def _fail(message: str) -> NoReturn:
    raise SemisparseError(message)


@dataclass
class ASTSettings:
    """AST's own settings (the `method:` section of a training config); checked on creation.

    `init`: the initial mask, from a pruner (magnitude needs no data; wanda/sparsegpt use `calibration`,
    `calibration_nsamples` x `calibration_seqlen` tokens) or the path of a model pruned to `pattern`.
    `mask_update_every` (Δt, 0 = fixed mask) and `mask_score` drive the adaptive mask. `decay_lambda` is
    SR-STE's λ, reached linearly after `decay_warmup_steps` (T0; default a quarter of the steps).
    The loss is `alpha_task` · CE + `alpha_kl` · T² · KL at `temperature` T, plus `layerwise` times the
    block-output term; the frozen `teacher` defaults to the model itself and is not loaded when both
    `alpha_kl` and `layerwise` are 0. `slorb*` add the SLoRB branch; `slorb_init="auto"` becomes the paper's
    "mean" when the kept weights are the dense ones (magnitude, Wanda) and "zeros" when SparseGPT already
    compensated them (sparsegpt or a pruned directory), where "mean" measured worse (196.6 vs 122.5
    perplexity on SmolLM2 before training). `keep_slorb` exports SLoRB beside the model instead of
    dropping it. `include` / `exclude` select the layers as in `semisparse prune`.
    """

    pattern: str = "2:4"
    init: str = "magnitude"
    mask_update_every: int = 10
    mask_score: str = "magnitude"
    decay_lambda: float = 1e-4
    decay_warmup_steps: int | None = None
    alpha_task: float = 0.33
    alpha_kl: float = 0.67
    temperature: float = 2.0
    layerwise: float = 0.0
    slorb: bool = False
    slorb_k: int = 16
    slorb_init: str = "auto"
    slorb_train_projection: bool = True
    keep_slorb: bool = False
    teacher: str | None = None
    calibration: str = "c4"
    calibration_nsamples: int = 128
    calibration_seqlen: int = 2048
    include: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        nm.parse_pattern(self.pattern)
        for name in ("decay_lambda", "alpha_task", "alpha_kl", "temperature", "layerwise"):
            setattr(self, name, self._number(name))
        for name in ("mask_update_every", "slorb_k", "calibration_nsamples", "calibration_seqlen"):
            self._integer(name, minimum=0 if name == "mask_update_every" else 1)
        if self.decay_warmup_steps is not None:
            self._integer("decay_warmup_steps", minimum=0)
        if self.init not in INIT_PRUNERS and not Path(self.init).expanduser().is_dir():
            _fail(
                f"AST init '{self.init}' is neither {', '.join(INIT_PRUNERS)} nor an existing directory: "
                "pick a pruner or pass the path of a model saved by `semisparse prune`"
            )
        if self.mask_score not in MASK_SCORES:
            _fail(f"unknown AST mask_score '{self.mask_score}': use one of {', '.join(MASK_SCORES)}")
        for name in ("decay_lambda", "alpha_task", "alpha_kl", "layerwise"):
            if getattr(self, name) < 0:
                _fail(f"AST {name}={getattr(self, name)} is negative: use a value >= 0")
        if self.temperature <= 0:
            _fail(f"AST temperature={self.temperature} must be positive: use e.g. 2.0")
        if self.alpha_task == 0 and self.alpha_kl == 0:
            _fail("AST alpha_task and alpha_kl are both 0, so nothing is trained: set at least one above 0")
        if self.slorb_init == "auto":
            self.slorb_init = "mean" if self.init in ("magnitude", "wanda") else "zeros"
        if self.slorb_init not in SLORB_INITS:
            choices = ", ".join(("auto", *SLORB_INITS))
            _fail(f"unknown AST slorb_init '{self.slorb_init}': use one of {choices}")
        if self.keep_slorb and not self.slorb:
            _fail("AST keep_slorb needs slorb: enable slorb or drop keep_slorb")
        for name in ("include", "exclude"):
            value = getattr(self, name)
            if isinstance(value, str) or not all(isinstance(item, str) for item in value):
                _fail(f"AST {name} must be a list of layer-name patterns, got {value!r}")
            setattr(self, name, list(value))

    def _number(self, name: str) -> float:
        """A float setting; also accepts strings such as YAML's "1e-4", which YAML 1.1 leaves as text."""
        value = getattr(self, name)
        try:
            if isinstance(value, bool):
                raise ValueError
            number = float(value)
        except (TypeError, ValueError):
            _fail(f"AST {name}={value!r} is not a number: write e.g. {name}: 0.5")
        if not math.isfinite(number):
            _fail(f"AST {name}={value!r} is not finite: use a finite number")
        return number

    def _integer(self, name: str, minimum: int) -> None:
        value = getattr(self, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            _fail(f"AST {name}={value!r} must be a whole number >= {minimum}")

    @property
    def nm_pattern(self) -> NMPattern:
        return nm.parse_pattern(self.pattern)

    def slorb_config(self, init: str | None = None) -> SLoRBConfig | None:
        if not self.slorb:
            return None
        return SLoRBConfig(self.slorb_k, init or self.slorb_init, self.slorb_train_projection)

    @property
    def needs_teacher(self) -> bool:
        return self.alpha_kl > 0 or self.layerwise > 0


def _calibration(tokenizer: Any, model: nn.Module, settings: ASTSettings, seed: int) -> tuple[Tensor, dict]:
    context = context_length(model)
    if settings.calibration_seqlen > context:
        _fail(
            f"AST calibration_seqlen {settings.calibration_seqlen} exceeds the model's context of {context}: "
            "use a smaller calibration_seqlen"
        )
    return calibration_ids(
        tokenizer, settings.calibration, settings.calibration_nsamples, settings.calibration_seqlen, seed
    )


def _masks_from_zeros(model: nn.Module, settings: ASTSettings, source: str) -> dict[str, Tensor]:
    """Keep-masks of an already pruned model: its nonzeros (exactly N per group, ties to lower index)."""
    pattern = settings.nm_pattern
    masks = {}
    for name, module in find_targets(model, settings.include, settings.exclude, m=pattern.m).items():
        weight = module_weight(module)
        if not nm.is_nm(weight, pattern.n, pattern.m):
            _fail(
                f"layer {name} of {source} is not {pattern} sparse: prune it with `semisparse prune "
                f"--pattern {pattern}` first, or use init magnitude/wanda/sparsegpt"
            )
        masks[name] = magnitude_mask(weight, pattern, None)
    return masks


def _dense_target_weights(model: nn.Module, settings: ASTSettings) -> dict[str, Tensor]:
    """CPU copies of the targets' [out, in] weights, taken before pruning overwrites them."""
    targets = find_targets(model, settings.include, settings.exclude, m=settings.nm_pattern.m)
    return {name: module_weight(module).detach().to("cpu", copy=True) for name, module in targets.items()}


def _initial_student(
    model_name: str, settings: ASTSettings, tokenizer: Any, device: str, seed: int, progress: bool
) -> tuple[nn.Module, dict[str, Tensor], dict[str, Tensor] | None, dict[str, Any]]:
    """The student before the swap, its initial masks, the dense weights for SLoRB's init, and provenance.

    Magnitude and Wanda leave kept weights untouched, so the student keeps all its dense weights (pruned
    ones can come back, as in the paper). SparseGPT updates the kept weights assuming the pruned ones are
    zero, so the student starts from its output, pruned entries zero.
    """
    want_dense = settings.slorb and settings.slorb_init != "zeros"
    if settings.init not in INIT_PRUNERS:
        student = load_model(settings.init, device=device)
        dense = _dense_target_weights(load_model(model_name), settings) if want_dense else None
        masks = _masks_from_zeros(student, settings, settings.init)
        if dense is not None:
            for name, mask in masks.items():
                if dense[name].shape != mask.shape:
                    _fail(
                        f"{settings.init} does not fit {model_name} (layer {name}): "
                        "use the model it was pruned from"
                    )
        return student, masks, dense, {"init": "pruned_model", "path": str(settings.init)}

    student = load_model(model_name, device=device)
    dense = _dense_target_weights(student, settings)
    ids, calibration_info = None, None
    if settings.init != "magnitude":
        ids, calibration_info = _calibration(tokenizer, student, settings, seed)
    prune(
        student,
        settings.init,
        settings.nm_pattern,
        calibration_ids=ids,
        include=settings.include,
        exclude=settings.exclude,
        device=device,
        progress=progress,
    )
    masks = _masks_from_zeros(student, settings, f"the {settings.init}-pruned model")
    if settings.init != "sparsegpt":
        targets = find_targets(student, settings.include, settings.exclude)
        with torch.no_grad():
            for name, module in targets.items():
                module_weight(module).copy_(dense[name])
    return (
        student,
        masks,
        dense if want_dense else None,
        {"init": settings.init, "calibration": calibration_info},
    )


def _load_teacher(name: str, student: nn.Module, device: str) -> nn.Module:
    """The frozen dense teacher: bf16 on GPUs (it only runs forward), float32 elsewhere."""
    dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    teacher = load_model(name, dtype=dtype, device=device)
    teacher.requires_grad_(False)
    vocab_t = teacher.get_output_embeddings().weight.shape[0]
    vocab_s = student.get_output_embeddings().weight.shape[0]
    if vocab_t != vocab_s:
        _fail(
            f"teacher {name} has {vocab_t} output tokens, the student {vocab_s}: "
            "use a teacher of the same family"
        )
    return teacher.eval()


class ASTMethod:
    """AST for the shared training loop (implements `TrainingMethod`)."""

    name = "ast"

    def __init__(
        self,
        model: nn.Module,
        teacher: nn.Module | None,
        tokenizer: Any,
        settings: ASTSettings,
        updater: MaskUpdater,
        total_steps: int,
        device: str,
        provenance: dict[str, Any],
    ) -> None:
        self.model = model
        self.teacher = teacher
        self.tokenizer = tokenizer
        self.settings = settings
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

    @classmethod
    def from_pretrained(
        cls,
        model_name: str,
        settings: ASTSettings,
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
            _fail(
                f"AST needs at least one optimizer step (total_steps={total_steps}): raise the token budget"
            )
        teacher_name = settings.teacher or model_name
        if settings.needs_teacher:
            try:
                resolve_model_path(teacher_name)
            except SemisparseError as err:
                raise SemisparseError(f"teacher: {err}") from err
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
                ids, info = _calibration(tokenizer, student, settings, seed)
                norms = collect_input_norms(student, layers, ids)
                provenance["mask_score_calibration"] = info
            else:
                norms = {
                    name: torch.zeros(layer.in_features, device=layer.weight.device)
                    for name, layer in layers.items()
                }
        updater = MaskUpdater(layers, settings.nm_pattern, settings.mask_score, norms)
        teacher = _load_teacher(teacher_name, student, device) if settings.needs_teacher else None
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
        ids = batch.to(self.device)
        hidden = self.settings.layerwise > 0
        student = self.model(input_ids=ids, output_hidden_states=hidden, use_cache=False)
        teacher = None
        if self.teacher is not None:
            with torch.no_grad():
                teacher = self.teacher(input_ids=ids, output_hidden_states=hidden, use_cache=False)
        loss, metrics = distillation_loss(
            student.logits,
            teacher.logits if teacher is not None and self.settings.alpha_kl > 0 else None,
            ids,
            self.settings.alpha_task,
            self.settings.alpha_kl,
            self.settings.temperature,
        )
        if hidden:
            assert teacher is not None
            extra = layerwise_loss(student.hidden_states[1:], teacher.hidden_states[1:])
            loss = loss + self.settings.layerwise * extra
            metrics["loss_layerwise"] = extra.item()
            metrics["loss"] = loss.item()
        return loss, metrics

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
            "settings": asdict(self.settings),
        }
