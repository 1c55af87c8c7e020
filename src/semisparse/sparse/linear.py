"""A linear layer that computes with `W ⊙ mask` but trains the full `W` (straight-through estimator).

Pruned weights keep receiving the gradient the dense layer would give them, so they can grow back and the
mask (recomputed elsewhere from the weights) can move during training. The mask is a bool buffer updated
in place, so optimizers and mask updaters holding a reference always see the current one.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from semisparse.sparse.slorb import SLoRB


def as_multiplier(mask: Tensor) -> Tensor:
    """A bool mask as 0/1 uint8 values to multiply a float tensor by: the kernel promotes uint8 as it goes,
    while a bool operand takes a slow per-element promotion path on CPU (3x slower) and converting the
    mask to the float dtype first costs another pass (1.5x slower)."""
    return mask.view(torch.uint8)


class _StraightThroughMask(torch.autograd.Function):
    """Forward `W ⊙ mask`; backward passes the gradient to every entry of `W`, pruned ones included."""

    @staticmethod
    def forward(weight: Tensor, mask: Tensor) -> Tensor:
        return weight * as_multiplier(mask)

    @staticmethod
    def setup_context(ctx: Any, inputs: Any, output: Any) -> None:
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx: Any, grad: Tensor | None) -> tuple[Tensor | None, None]:
        return grad, None


def straight_through_mask(weight: Tensor, mask: Tensor) -> Tensor:
    return _StraightThroughMask.apply(weight, mask)


class SparseLinear(nn.Module):
    """`y = x (W ⊙ m)ᵀ + b (+ SLoRB(x))`, with `W` stored [out, in] whatever the original layout was.

    `source` records the layer class it replaced ("linear" or "conv1d", GPT-2's [in, out] layout), so
    `to_dense_module` gives back a module that plain transformers checkpoints expect.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        source: str = "linear",
    ) -> None:
        super().__init__()
        if source not in ("linear", "conv1d"):
            raise ValueError(f"source must be 'linear' or 'conv1d', got {source!r}")
        self.in_features = in_features
        self.out_features = out_features
        self.source = source
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None
        self.register_buffer("mask", torch.ones(out_features, in_features, dtype=torch.bool, device=device))
        self.slorb: SLoRB | None = None

    @classmethod
    def from_module(cls, module: nn.Module, mask: Tensor) -> SparseLinear:
        """Wrap an nn.Linear (sharing its parameters) or a GPT-2 Conv1D (weight transposed to [out, in])."""
        if isinstance(module, Conv1D):
            weight = nn.Parameter(module.weight.detach().t().contiguous(), module.weight.requires_grad)
            source = "conv1d"
        elif isinstance(module, nn.Linear):
            weight, source = module.weight, "linear"
        else:
            raise TypeError(f"{type(module).__name__} is not a Linear or Conv1D layer")
        out_features, in_features = weight.shape
        if tuple(mask.shape) != (out_features, in_features):
            raise ValueError(
                f"mask of shape {tuple(mask.shape)} does not fit a weight of {tuple(weight.shape)}"
            )
        layer = cls(in_features, out_features, bias=False, device="meta", source=source)
        layer.weight = weight
        layer.bias = module.bias
        layer.mask = mask.to(device=weight.device, dtype=torch.bool).clone()
        return layer

    def forward(self, x: Tensor) -> Tensor:
        weight, device = self.weight, x.device.type
        if torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device):
            # Cast first, as autocast would, so the masking runs on the half-size copy.
            weight = weight.to(torch.get_autocast_dtype(device))
        out = F.linear(x, straight_through_mask(weight, self.mask), self.bias)
        if self.slorb is not None:
            out = out + self.slorb(x)
        return out

    def masked_weight(self) -> Tensor:
        """`W ⊙ mask`, detached: what the layer computes with, for export and evaluation."""
        return (self.weight * self.mask).detach()

    @torch.no_grad()
    def to_dense_module(self) -> nn.Module:
        """A plain Linear / Conv1D holding `W ⊙ mask` (the SLoRB branch is not part of it)."""
        self.weight.mul_(self.mask)
        with torch.device("meta"):
            if self.source == "conv1d":
                dense: nn.Module = Conv1D(self.out_features, self.in_features)
            else:
                dense = nn.Linear(self.in_features, self.out_features)
        if self.source == "conv1d":
            dense.weight = nn.Parameter(self.weight.t().contiguous(), self.weight.requires_grad)
        else:
            dense.weight = self.weight
        dense.bias = self.bias
        return dense

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, source={self.source}"
        )
