"""Prior initialisation: bias each group's logits towards the candidate a one-shot pruner chose.

`π_i += α · std(π) · (⟨M0, S_i⟩ − N/2)`: for 2:4 that is +α·std for the prior's own candidate, −α·std for
its complement and 0 for the four half-overlapping ones. Without a prior, MaskLLM starts from uniform
random logits and learns a much worse mask in the same budget.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from semisparse import nm
from semisparse.calibration import Calibration
from semisparse.errors import SemisparseError
from semisparse.maskfiles import to_parameter_layout
from semisparse.maskllm.candidates import overlaps
from semisparse.modules import FilterFn, find_targets, set_weight_matrix, weight_matrix
from semisparse.pruning import PrunerConfig, calibrate_and_prune


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
    tokenizer: Any,
    config: PrunerConfig,
    calibration: Calibration | None = None,
    filter_fn: FilterFn | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> tuple[dict[str, Tensor], dict[str, Any] | None]:
    """The N:M masks a one-shot pruner picks, keyed by weight parameter name, in the parameter's layout,
    and the calibration provenance.

    MaskLLM keeps the dense weights, but a pruner may also update the weights it keeps (SparseGPT), so
    the targets are backed up (on the CPU), pruned in place, read and restored bit for bit.
    """
    pattern = config.nm_pattern
    if pattern is None:
        raise SemisparseError("a MaskLLM prior needs an N:M `pattern`, not an unstructured `sparsity`")
    targets = find_targets(model, filter_fn, m=pattern.m)
    backup = {name: weight_matrix(module).detach().to("cpu", copy=True) for name, module in targets.items()}
    try:
        _, calibration_info = calibrate_and_prune(
            model, tokenizer, config, calibration, filter_fn, device, progress
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
    return masks, calibration_info
