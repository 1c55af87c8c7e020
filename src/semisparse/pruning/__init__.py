"""One-shot pruners (magnitude, Wanda, SparseGPT) to N:M or unstructured sparsity.

`prune` validates the request, picks the target layers, and runs magnitude directly (it needs no data)
or Wanda / SparseGPT through the sequential calibration engine.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from semisparse import nm
from semisparse.errors import SemisparseError
from semisparse.models import find_targets, weight_matrix
from semisparse.nm import NMPattern
from semisparse.pruning.engine import LayerPruner, run_sequential
from semisparse.pruning.magnitude import prune_magnitude
from semisparse.pruning.sparsegpt import SparseGPTPruner
from semisparse.pruning.wanda import WandaPruner

PRUNING_METHODS: tuple[str, ...] = ("magnitude", "wanda", "sparsegpt")

__all__ = ["PRUNING_METHODS", "prune"]


def _check_request(
    method: str,
    pattern: NMPattern | None,
    sparsity: float | None,
    calibration_ids: Tensor | None,
    blocksize: int,
    percdamp: float,
) -> None:
    """Reject bad arguments up front, each with a one-line fix."""
    if method not in PRUNING_METHODS:
        raise SemisparseError(f"unknown pruning method '{method}': use one of {', '.join(PRUNING_METHODS)}")
    if (pattern is None) == (sparsity is None):
        raise SemisparseError("give exactly one of pattern (e.g. 2:4) and sparsity (e.g. 0.5)")
    if sparsity is not None and not 0.0 < sparsity < 1.0:
        raise SemisparseError(f"sparsity {sparsity} is outside (0, 1): use e.g. 0.5 for half of the weights")
    if method == "magnitude":
        return
    if calibration_ids is None:
        raise SemisparseError(
            f"{method} needs calibration data: pass calibration_ids (or use method='magnitude')"
        )
    if calibration_ids.dim() != 2 or calibration_ids.shape[0] == 0 or calibration_ids.shape[1] == 0:
        raise SemisparseError(
            f"calibration_ids must be [n_samples, seqlen] with at least one sample and one token, "
            f"got shape {tuple(calibration_ids.shape)}: pass more calibration samples"
        )
    if calibration_ids.is_floating_point() or calibration_ids.is_complex():
        raise SemisparseError(
            "calibration_ids must hold integer token ids: tokenize the calibration text first"
        )
    if method == "sparsegpt":
        if blocksize <= 0 or (pattern is not None and blocksize % pattern.m != 0):
            m = pattern.m if pattern is not None else 1
            raise SemisparseError(f"blocksize {blocksize} must be a positive multiple of M={m}: use e.g. 128")
        if percdamp < 0:
            raise SemisparseError(f"percdamp {percdamp} is negative: use e.g. 0.01")


def prune(
    model: nn.Module,
    method: str = "sparsegpt",
    pattern: NMPattern | str | None = None,
    sparsity: float | None = None,
    calibration_ids: Tensor | None = None,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    blocksize: int = 128,
    percdamp: float = 0.01,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> dict[str, float]:
    """Prune the model's decoder-block linears in place; returns each target's fraction of zeros.

    Exactly one of `pattern` (N:M along the input dimension) and `sparsity` (unstructured, per row) is
    given. Wanda and SparseGPT calibrate sequentially on `calibration_ids` [n_samples, seqlen].
    """
    if isinstance(pattern, str):
        pattern = nm.parse_pattern(pattern)
    _check_request(method, pattern, sparsity, calibration_ids, blocksize, percdamp)
    targets = find_targets(model, include, exclude, m=pattern.m if pattern is not None else None)

    if method == "magnitude":
        for module in targets.values():
            prune_magnitude(module, pattern, sparsity)
    else:
        assert calibration_ids is not None

        def make_pruner(name: str, module: nn.Module) -> LayerPruner:
            if method == "wanda":
                return WandaPruner(module, pattern, sparsity)
            return SparseGPTPruner(module, pattern, sparsity, blocksize, percdamp, name)

        desc = f"{method} {pattern}" if pattern is not None else f"{method} {sparsity:.0%}"
        run_sequential(model, targets, make_pruner, calibration_ids, device, progress, desc)
    return {name: nm.sparsity(weight_matrix(module)) for name, module in targets.items()}
