"""Wanda (Sun et al. 2023): prune by `|W_ij| * ||X_j||_2`, without any weight update.

`X_j` is input feature `j` over all calibration tokens; only its squared norm is accumulated, so the
memory per layer is one float32 vector of the input size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from semisparse.modules import weight_matrix
from semisparse.nm import NMPattern
from semisparse.pruning.config import PrunerConfig
from semisparse.pruning.magnitude import apply_mask, select_mask
from semisparse.registry import register


def wanda_mask(
    weight: Tensor, input_sq_norms: Tensor, pattern: NMPattern | None, sparsity: float | None
) -> Tensor:
    """Keep-mask of an [out, in] weight by `|W_ij| * sqrt(input_sq_norms_j)`."""
    norms = input_sq_norms.to(device=weight.device, dtype=torch.float32).sqrt()
    return select_mask(weight.detach().float().abs() * norms.unsqueeze(0), pattern, sparsity)


class WandaPruner:
    """Accumulates the squared input norms of one layer from its forward hook, then prunes it."""

    def __init__(self, module: nn.Module, pattern: NMPattern | None, sparsity: float | None) -> None:
        self.module = module
        self.pattern = pattern
        self.sparsity = sparsity
        weight = weight_matrix(module)
        self.input_sq_norms = torch.zeros(weight.shape[1], dtype=torch.float32, device=weight.device)

    def add_batch(self, inp: Tensor) -> None:
        """Add the squared values of every input feature over the tokens of `inp` [..., in]."""
        x = inp.detach().reshape(-1, inp.shape[-1]).to(device=self.input_sq_norms.device, dtype=torch.float32)
        self.input_sq_norms += x.square().sum(dim=0)

    def adopt_statistics(self, leader: WandaPruner) -> None:
        """Use `leader`'s input norms: the engine saw this layer receive the very same inputs (e.g. q/k/v)."""
        self.input_sq_norms = leader.input_sq_norms

    @torch.no_grad()
    def prune(self) -> None:
        mask = wanda_mask(weight_matrix(self.module), self.input_sq_norms, self.pattern, self.sparsity)
        apply_mask(self.module, mask)


@dataclass
class WandaConfig(PrunerConfig):
    """Wanda: no settings beyond the target sparsity; the calibration data give the input norms."""

    owner: ClassVar[str] = "wanda"


@register(
    "pruner", "wanda", WandaConfig, summary="keep the largest |W|·‖X‖ per group", needs_calibration=True
)
def wanda_pruner(name: str, module: nn.Module, config: WandaConfig) -> WandaPruner:
    return WandaPruner(module, config.nm_pattern, config.sparsity)
