"""Swapping a model's target layers for learnable-mask layers and back, plus the run's diagnostics.

Layers are replaced in place under their own names, so parameter names stay `<module>.weight` / `.bias`
(plus `<module>.logits`) and masks are keyed by the same weight names as in mask files.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from semisparse.maskfiles import check_masks, to_matrix_layout
from semisparse.maskllm.candidates import matching_candidate
from semisparse.maskllm.layer import LearnableMaskLinear
from semisparse.maskllm.prior import prior_logits
from semisparse.modules import find_targets, layer_filter, set_submodule
from semisparse.nm import NMPattern

# AdamW keeps two moments per trainable value; with the gradient that is three extra copies.
_ADAM_STATES = 2


def learnable_layers(model: nn.Module) -> dict[str, LearnableMaskLinear]:
    """The model's learnable-mask layers by module name, in module order."""
    return {name: module for name, module in model.named_modules() if isinstance(module, LearnableMaskLinear)}


def attach_learnable_masks(
    model: nn.Module,
    pattern: NMPattern,
    prior: dict[str, Tensor] | None = None,
    alpha: float = 3.0,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    seed: int = 0,
) -> dict[str, LearnableMaskLinear]:
    """Replace every target layer by a `LearnableMaskLinear`, logits biased towards `prior` if given.

    `prior` maps weight parameter names to bool masks in the parameter's layout (as mask files do); it is
    checked like a mask file. Logits are drawn layer by layer from one generator per device seeded with
    `seed`, so a run is reproducible on the same kind of device.
    """
    if prior is not None:
        check_masks(model, prior, pattern, include, exclude, source="the prior masks")
    generators: dict[torch.device, torch.Generator] = {}
    layers = {}
    for name, module in find_targets(model, layer_filter(include, exclude), m=pattern.m).items():
        device = module.weight.device
        if device not in generators:
            generators[device] = torch.Generator(device=device).manual_seed(seed)
        layer = LearnableMaskLinear.from_module(module, pattern, generators[device])
        if prior is not None:
            mask = to_matrix_layout(module, prior[f"{name}.weight"]).to(layer.logits.device)
            with torch.no_grad():
                layer.logits.copy_(prior_logits(layer.logits, mask, layer.candidates, pattern.n, alpha))
        set_submodule(model, name, layer)
        layers[name] = layer
    return layers


def set_schedule(model: nn.Module, tau: float, kappa: float, hard: bool) -> None:
    """Set the Gumbel-softmax temperature, logit scale and hard/soft mode of every layer."""
    for layer in learnable_layers(model).values():
        layer.tau, layer.kappa, layer.hard = tau, kappa, hard


def regulariser(model: nn.Module) -> Tensor:
    """Σ_layers ‖W ⊙ M̃‖²_F of the masks sampled in the latest training forward (W detached).

    The training loss subtracts λ times this, rewarding masks that keep large weights.
    """
    terms = []
    for name, layer in learnable_layers(model).items():
        if layer.last_regulariser is None:
            raise RuntimeError(f"layer {name} has not run a training forward yet: call model.train() first")
        terms.append(layer.last_regulariser)
    return torch.stack(terms).sum()


def final_masks(model: nn.Module) -> dict[str, Tensor]:
    """The argmax masks, keyed by weight parameter name, each in its parameter's layout (bool, CPU)."""
    masks = {}
    for name, layer in learnable_layers(model).items():
        mask = layer.argmax_mask()
        masks[f"{name}.weight"] = (mask.t().contiguous() if layer.source == "conv1d" else mask).cpu()
    return masks


def _plain_module(layer: LearnableMaskLinear) -> nn.Module:
    """The original module class holding W ⊙ argmax mask, so `save_pretrained` writes plain transformers."""
    weight = layer.masked_weight()
    with torch.device("meta"):
        if layer.source == "conv1d":
            module: nn.Module = Conv1D(layer.out_features, layer.in_features)
        else:
            module = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
    module.weight = nn.Parameter(weight.t().contiguous() if layer.source == "conv1d" else weight)
    if layer.bias is not None:
        module.bias = nn.Parameter(layer.bias.detach())
    return module


def detach_learnable_masks(model: nn.Module) -> dict[str, LearnableMaskLinear]:
    """Swap every learnable layer back to a plain module with W ⊙ mask; returns the removed layers."""
    layers = learnable_layers(model)
    for name, layer in layers.items():
        set_submodule(model, name, _plain_module(layer))
    return layers


def reattach(model: nn.Module, layers: dict[str, LearnableMaskLinear]) -> None:
    """Put layers removed by `detach_learnable_masks` back (used to export mid-run and keep training)."""
    for name, layer in layers.items():
        set_submodule(model, name, layer)


def candidate_indices(model: nn.Module) -> dict[str, Tensor]:
    """The argmax candidate of every group, per layer ([out, in/M], int64, on the layer's device)."""
    return {name: layer.candidate_index() for name, layer in learnable_layers(model).items()}


def mask_candidates(model: nn.Module, masks: dict[str, Tensor]) -> dict[str, Tensor]:
    """Per layer, the candidate each group of `masks` (param layout, keyed by weight name) corresponds to."""
    found = {}
    for name, layer in learnable_layers(model).items():
        mask = masks[f"{name}.weight"]
        mask = (mask.t() if layer.source == "conv1d" else mask).to(layer.logits.device)
        found[name] = matching_candidate(mask, layer.candidates)
    return found


def flip_fraction(model: nn.Module, reference: dict[str, Tensor]) -> float:
    """Fraction of all groups whose argmax candidate differs from `reference` (e.g. the prior's)."""
    changed, total = [], 0
    for name, index in candidate_indices(model).items():
        changed.append((index != reference[name].to(index.device)).sum())
        total += index.numel()
    return float(torch.stack(changed).sum()) / total if total else 0.0


def mean_max_probability(model: nn.Module) -> float:
    """Mean over all groups of the largest candidate probability in the latest sample (1 = decided)."""
    weighted, groups = [], 0
    for layer in learnable_layers(model).values():
        if layer.last_max_probability is not None:
            count = layer.logits.shape[0] * layer.logits.shape[1]
            weighted.append(layer.last_max_probability * count)
            groups += count
    return float(torch.stack(weighted).sum()) / groups if groups else float("nan")


def memory_per_weight(model: nn.Module, train_weights: bool = False) -> dict[str, float]:
    """Bytes of training state per masked weight: weight, logits, their gradients and AdamW moments."""
    layers = list(learnable_layers(model).values())
    count = sum(layer.weight.numel() for layer in layers)
    if not count:
        return {}
    weight = sum(layer.weight.numel() * layer.weight.element_size() for layer in layers) / count
    logits = sum(layer.logits.numel() * layer.logits.element_size() for layer in layers) / count
    trainable = logits + (weight if train_weights else 0.0)
    return {
        "weight": weight,
        "logits": logits,
        "gradients": trainable,
        "optimizer": _ADAM_STATES * trainable,
        "total": weight + logits + (1 + _ADAM_STATES) * trainable,
    }
