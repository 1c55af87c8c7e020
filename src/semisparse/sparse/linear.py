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
    while a bool operand takes a slow per-element promotion path on CPU and converting the mask to the
    float dtype first costs another pass over it."""
    return mask.view(torch.uint8)


def _masked(weight: Tensor, mask: Tensor, dtype: torch.dtype) -> Tensor:
    if weight.dtype == dtype:
        return weight * as_multiplier(mask)
    return weight.to(dtype).mul_(as_multiplier(mask))


class _MaskedLinear(torch.autograd.Function):
    """`y = x (W ⊙ m)ᵀ + b` computed in `dtype`, whose backward gives every entry of `W` its dense gradient
    `gᵀx` (straight-through), pruned ones included.

    Only `x`, `W` and the mask are saved; the masked copy is made again in the backward. Keeping it would
    hold a second copy of every sparse weight until the backward: ~13 GB for a 7B model under bf16 autocast.
    """

    @staticmethod
    def forward(
        ctx: Any, x: Tensor, weight: Tensor, mask: Tensor, bias: Tensor | None, dtype: torch.dtype
    ) -> Tensor:
        x = x.to(dtype)
        ctx.save_for_backward(x, weight, mask)
        ctx.dtype, ctx.bias_dtype = dtype, None if bias is None else bias.dtype
        return F.linear(x, _masked(weight, mask, dtype), None if bias is None else bias.to(dtype))

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, weight, mask = ctx.saved_tensors
        grad = grad.to(ctx.dtype)
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = grad @ _masked(weight, mask, ctx.dtype)
        rows = grad.reshape(-1, grad.shape[-1])
        if ctx.needs_input_grad[1]:
            grad_weight = (rows.t() @ x.reshape(-1, x.shape[-1])).to(weight.dtype)
        if ctx.needs_input_grad[3]:
            grad_bias = rows.sum(0).to(ctx.bias_dtype)
        return grad_x, grad_weight, None, grad_bias, None


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
        device, dtype = x.device.type, self.weight.dtype
        if torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device):
            dtype = torch.get_autocast_dtype(device)  # what autocast would run the linear in
        elif x.dtype != dtype:
            raise RuntimeError(f"input dtype {x.dtype} does not match the weight's {dtype}")
        out = _MaskedLinear.apply(x, self.weight, self.mask, self.bias, dtype)
        if self.slorb is not None:
            out = out + self.slorb(x)
        return out

    def masked_weight(self) -> Tensor:
        """`W ⊙ mask`, detached: what the layer computes with, for export and evaluation."""
        return _masked(self.weight, self.mask, self.weight.dtype).detach()

    @torch.no_grad()
    def to_dense_module(self) -> nn.Module:
        """A plain Linear / Conv1D holding `W ⊙ mask` (the SLoRB branch is not part of it)."""
        self.weight.mul_(as_multiplier(self.mask))
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
