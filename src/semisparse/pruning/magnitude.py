"""Magnitude pruning, and the mask selection and masking shared by the score-based pruners.

Magnitude needs no calibration data: the score of a weight is `|W_ij|`, and in every group of `M`
consecutive inputs of a row the `N` largest survive (or, unstructured, a fixed fraction of every row).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from semisparse import nm
from semisparse.modules import set_weight_matrix, weight_matrix
from semisparse.nm import NMPattern
from semisparse.pruning.config import PrunerConfig
from semisparse.registry import register


def select_mask(scores: Tensor, pattern: NMPattern | None, sparsity: float | None) -> Tensor:
    """Boolean keep-mask from scores: N:M groups along the input dim, or a per-row fraction pruned."""
    if pattern is not None:
        return nm.nm_mask(scores, pattern.n, pattern.m)
    if sparsity is None:
        raise ValueError("select_mask needs a pattern or a sparsity")
    return nm.unstructured_mask(scores, sparsity)


def magnitude_mask(weight: Tensor, pattern: NMPattern | None, sparsity: float | None) -> Tensor:
    """Keep-mask of an [out, in] weight by `|W_ij|` (scored in float32 so half precision ties no more)."""
    return select_mask(weight.detach().float().abs(), pattern, sparsity)


def apply_mask(module: nn.Module, mask: Tensor) -> None:
    """Zero the pruned weights of a Linear / Conv1D in place, given an [out, in] keep-mask."""
    weight = weight_matrix(module)
    set_weight_matrix(module, weight.masked_fill(~mask.to(weight.device), 0))


@torch.no_grad()
def prune_magnitude(module: nn.Module, pattern: NMPattern | None, sparsity: float | None) -> None:
    """Prune one layer by weight magnitude."""
    apply_mask(module, magnitude_mask(weight_matrix(module), pattern, sparsity))


@dataclass
class MagnitudeConfig(PrunerConfig):
    """Magnitude pruning: no settings beyond the target sparsity."""

    owner: ClassVar[str] = "magnitude"


class MagnitudePruner:
    """Magnitude as a layer pruner: it ignores calibration inputs, so it can also run without any."""

    def __init__(self, module: nn.Module, config: MagnitudeConfig) -> None:
        self.module = module
        self.config = config

    def add_batch(self, inp: Tensor) -> None:
        return None

    def prune(self) -> None:
        prune_magnitude(self.module, self.config.nm_pattern, self.config.sparsity)


@register("pruner", "magnitude", MagnitudeConfig, summary="keep the largest |W| in every group; no data")
def magnitude_pruner(name: str, module: nn.Module, config: MagnitudeConfig) -> MagnitudePruner:
    return MagnitudePruner(module, config)
