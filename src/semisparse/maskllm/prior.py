"""Prior initialisation: bias each group's logits towards the candidate a one-shot pruner chose.

`π_i += α · std(π) · (⟨M0, S_i⟩ − N/2)`: for 2:4 that is +α·std for the prior's own candidate, −α·std for
its complement and 0 for the four half-overlapping ones. Without a prior, MaskLLM starts from uniform
random logits and learns a much worse mask in the same budget.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from semisparse import nm
from semisparse.errors import SemisparseError
from semisparse.maskfiles import to_parameter_layout
from semisparse.maskllm.candidates import overlaps
from semisparse.models import find_targets, set_weight_matrix, weight_matrix
from semisparse.nm import NMPattern
from semisparse.pruning import PRUNING_METHODS, prune

PRIOR_METHODS: tuple[str, ...] = (*PRUNING_METHODS, "none")


def prior_logits(logits: Tensor, mask: Tensor, candidates: Tensor, n: int, alpha: float) -> Tensor:
    """The logits [out, in/M, C] shifted towards the [out, in] bool `mask`'s candidates (a new tensor).

    `std(π)` is the standard deviation of this layer's logits before the shift; α = 0 returns them as is.
    """
    if alpha == 0:
        return logits.clone()
    shift = overlaps(mask, candidates) - n / 2
    return logits + alpha * logits.std() * shift


def one_shot_masks(
    model: nn.Module,
    method: str,
    pattern: NMPattern,
    calibration_ids: Tensor | None = None,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    device: str | torch.device | None = None,
    progress: bool = True,
) -> dict[str, Tensor]:
    """The N:M masks a one-shot pruner picks, keyed by weight parameter name, in the parameter's layout.

    MaskLLM keeps the dense weights, but SparseGPT also updates the weights it keeps, so the targets are
    backed up (on the CPU), pruned in place, read and restored bit for bit.
    """
    if method not in PRUNING_METHODS:
        raise SemisparseError(f"unknown prior '{method}': use one of {', '.join(PRIOR_METHODS)}")
    targets = find_targets(model, include, exclude, m=pattern.m)
    backup = {name: weight_matrix(module).detach().to("cpu", copy=True) for name, module in targets.items()}
    try:
        prune(
            model,
            method=method,
            pattern=pattern,
            calibration_ids=calibration_ids,
            include=include,
            exclude=exclude,
            device=device,
            progress=progress,
        )
        masks = {}
        for name, module in targets.items():
            kept = (weight_matrix(module).detach() != 0).float()
            # A kept weight that is exactly zero would leave its group short of N: fill it deterministically.
            matrix_mask = nm.nm_mask(kept, pattern.n, pattern.m)
            masks[f"{name}.weight"] = to_parameter_layout(module, matrix_mask).cpu()
    finally:
        for name, module in targets.items():
            set_weight_matrix(module, backup[name].to(weight_matrix(module).device))
    return masks
