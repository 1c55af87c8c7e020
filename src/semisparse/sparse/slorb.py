"""SLoRB (Sparse Low-Rank Boosting): a small dense branch that gives a 2:4 layer back some of what it lost.

For a layer with weight `W` [out, in] and group size `k`, SLoRB adds `y += (x Xᵀ) Sᵀ` with `S` [out, in/k]
and `X` [in/k, in], `X[i, j] = 1` iff `j // k == i`. `S` starts from the pruned weights of each row and
input group, so the boosted layer initially approximates the dense one where inputs within a group agree.
The branch is dense, so it cannot be folded into the 2:4 weight and stays separate at inference.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from semisparse.errors import SemisparseError

SLORB_INITS: tuple[str, ...] = ("mean", "sum", "zeros")


@dataclass(frozen=True)
class SLoRBConfig:
    """Group size `k`, how `S` starts, and whether the projection `X` is trained too."""

    k: int = 16
    init: str = "mean"
    train_projection: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise SemisparseError(
                f"SLoRB group size k={self.k!r} is invalid: use a positive integer (e.g. 16)"
            )
        if self.init not in SLORB_INITS:
            raise SemisparseError(f"unknown SLoRB init '{self.init}': use one of {', '.join(SLORB_INITS)}")


def check_group_size(in_features: int, k: int, name: str) -> None:
    """SLoRB groups tile the inputs, so `k` must divide the layer's input size."""
    if in_features % k:
        raise SemisparseError(
            f"SLoRB group size k={k} does not divide the {in_features} inputs of {name}: "
            f"choose a k that divides {in_features} (e.g. 16) or exclude the layer"
        )


def group_projection(in_features: int, k: int, dtype: torch.dtype = torch.float32, device=None) -> Tensor:
    """The block-indicator matrix `X` [in/k, in]: row i sums the inputs of group i."""
    groups = torch.arange(in_features // k, device=device)
    columns = torch.arange(in_features, device=device)
    return (columns.unsqueeze(0) // k == groups.unsqueeze(1)).to(dtype)


def initial_scales(weight: Tensor, mask: Tensor, k: int, init: str) -> Tensor:
    """`S` [out, in/k] from the pruned entries of `weight`: their sum per group, divided by k for "mean".

    "mean" averages over all k positions of a group (kept ones count as zero), so that a group whose
    inputs are all equal to `x̄` gets back exactly the output its pruned weights would have produced.
    """
    out_features, in_features = weight.shape
    if init == "zeros":
        return weight.new_zeros(out_features, in_features // k)
    pruned = weight.detach().float().masked_fill(mask.to(weight.device), 0)
    sums = pruned.reshape(out_features, in_features // k, k).sum(-1)
    return (sums / k if init == "mean" else sums).to(weight.dtype)


class SLoRB(nn.Module):
    """The boosting branch of one layer; `X` is a parameter when trained, else implied (never stored)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        k: int,
        train_projection: bool = True,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        name: str = "layer",
    ) -> None:
        super().__init__()
        check_group_size(in_features, k, name)
        self.in_features = in_features
        self.out_features = out_features
        self.k = k
        self.S = nn.Parameter(torch.zeros(out_features, in_features // k, dtype=dtype, device=device))
        self.X: nn.Parameter | None = None
        if train_projection:
            self.X = nn.Parameter(group_projection(in_features, k, dtype or torch.float32, device))

    @property
    def train_projection(self) -> bool:
        return self.X is not None

    def forward(self, x: Tensor) -> Tensor:
        if self.X is None:
            grouped = x.reshape(*x.shape[:-1], self.in_features // self.k, self.k).sum(-1)
        else:
            grouped = F.linear(x, self.X)
        return F.linear(grouped, self.S)

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, k={self.k}, "
            f"train_projection={self.train_projection}"
        )
