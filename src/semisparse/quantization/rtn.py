"""Quantization grid of kept weights, and round-to-nearest (RTN) onto it.

The grid is asymmetric by default: per row and per group of `group_size` dense input columns (or per row
when `group_size` is None), `lo = min(kept, 0)`, `hi = max(kept, 0)`, `scale = (hi - lo) / (2^bits - 1)`
and `zero = round(-lo / scale)`; a weight becomes the code `q = clamp(round(w / scale) + zero, 0, 2^bits - 1)`
and dequantizes to `(q - zero) * scale`. Symmetric grids fix `zero = 2^(bits-1)` and use
`scale = max|kept| / (2^(bits-1) - 1)`, so no zero points are stored. Only kept weights (the mask) enter the
statistics and get codes; pruned weights stay exactly zero, so an N:M layer stays N:M.

Scales are stored as float16 and used as the float16 value, and dequantization is `(q - zero) * scale` in
float32 cast to the model dtype, so the same codes always give bit-identical weights (lossless export).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

import torch
from torch import Tensor, nn

from semisparse.modules import set_weight_matrix, weight_matrix
from semisparse.quantization.config import QuantizerConfig
from semisparse.registry import register

SCALE_DTYPE = torch.float16
_SMALLEST_SCALE = 2.0**-14  # float16's smallest normal: scales below it would lose precision or underflow


@dataclass
class QuantizedWeight:
    """One layer's integer codes and grid; `dequantize` gives the weight the model computes with.

    `codes` is uint8 [out, in] in the dense layout (0 at pruned positions), `mask` bool [out, in] marks the
    kept weights, `scales` float16 [out, groups], `zeros` uint8 [out, groups] (None when symmetric).
    """

    codes: Tensor
    mask: Tensor
    scales: Tensor
    zeros: Tensor | None
    bits: int
    group_size: int | None

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The [out, in] weight: `(q - zero) * scale` on kept positions, exactly 0 elsewhere."""
        cols = self.codes.shape[1]
        scale = expand_groups(self.scales.float(), cols, self.group_size)
        zero = expand_groups(grid_zeros(self), cols, self.group_size)
        values = (self.codes.float() - zero) * scale
        return torch.where(self.mask, values, torch.zeros_like(values)).to(dtype)


def move_to(qw: QuantizedWeight, device: torch.device) -> QuantizedWeight:
    """The same codes and grid on another device (results of GPU calibration are kept on the CPU)."""
    zeros = None if qw.zeros is None else qw.zeros.to(device)
    return replace(
        qw, codes=qw.codes.to(device), mask=qw.mask.to(device), scales=qw.scales.to(device), zeros=zeros
    )


def grid_zeros(qw: QuantizedWeight) -> Tensor:
    """Zero points as float32 [out, groups]; the fixed midpoint for symmetric grids."""
    if qw.zeros is not None:
        return qw.zeros.float()
    return torch.full(qw.scales.shape, float(2 ** (qw.bits - 1)), device=qw.scales.device)


def n_groups(cols: int, group_size: int | None) -> int:
    return 1 if group_size is None else -(-cols // group_size)


def expand_groups(per_group: Tensor, cols: int, group_size: int | None) -> Tensor:
    """[out, groups] -> [out, cols]: each group's value repeated over its columns."""
    if group_size is None:
        return per_group.expand(per_group.shape[0], cols)
    return per_group.repeat_interleave(group_size, dim=1)[:, :cols]


def grid_for(weight: Tensor, mask: Tensor, bits: int, symmetric: bool) -> tuple[Tensor, Tensor | None]:
    """Scale (float16-representable, float32 [rows, 1]) and zero point (float32 or None) of a column group.

    Statistics use kept weights only; rows with no kept weight get scale 1 and code the zero point.
    """
    w = weight.float()
    qmax = 2**bits - 1
    if symmetric:
        amax = torch.where(mask, w.abs(), torch.zeros_like(w)).amax(dim=1, keepdim=True)
        scale = amax / (2 ** (bits - 1) - 1)
    else:
        big = torch.finfo(torch.float32).max
        lo = torch.where(mask, w, torch.full_like(w, big)).amin(dim=1, keepdim=True).clamp(max=0)
        hi = torch.where(mask, w, torch.full_like(w, -big)).amax(dim=1, keepdim=True).clamp(min=0)
        scale = (hi - lo) / qmax
    scale = torch.where(scale > 0, scale.clamp(min=_SMALLEST_SCALE), torch.ones_like(scale))
    scale = scale.to(SCALE_DTYPE).float()
    if symmetric:
        return scale, None
    zero = torch.round(-lo / scale).clamp(0, qmax)
    return scale, zero


def quantize_codes(weight: Tensor, scale: Tensor, zero: Tensor, bits: int) -> Tensor:
    """Round-to-nearest codes (float32, integral) of `weight` on the grid `(scale, zero)` (broadcast)."""
    return torch.clamp(torch.round(weight.float() / scale) + zero, 0, 2**bits - 1)


def rtn_quantize(
    weight: Tensor, mask: Tensor, bits: int, group_size: int | None, symmetric: bool = False
) -> QuantizedWeight:
    """Round every kept weight of an [out, in] matrix to the nearest point of its group's grid."""
    rows, cols = weight.shape
    size = cols if group_size is None else group_size
    codes = torch.zeros(rows, cols, dtype=torch.uint8, device=weight.device)
    scales, zeros = [], []
    for start in range(0, cols, size):
        group = slice(start, min(start + size, cols))
        scale, zero = grid_for(weight[:, group], mask[:, group], bits, symmetric)
        mid = torch.full_like(scale, 2 ** (bits - 1)) if zero is None else zero
        q = quantize_codes(weight[:, group], scale, mid, bits)
        codes[:, group] = torch.where(mask[:, group], q, torch.zeros_like(q)).to(torch.uint8)
        scales.append(scale)
        zeros.append(zero)
    return QuantizedWeight(
        codes=codes,
        mask=mask.clone(),
        scales=torch.cat(scales, dim=1).to(SCALE_DTYPE),
        zeros=None if symmetric else torch.cat(zeros, dim=1).to(torch.uint8),
        bits=bits,
        group_size=group_size,
    )


@dataclass
class RTNConfig(QuantizerConfig):
    """Round-to-nearest: no data, no settings beyond the grid."""

    owner: ClassVar[str] = "rtn"


class RTNQuantizer:
    """Round-to-nearest as a layer quantizer (the engine's interface); the codes end up in `result`."""

    def __init__(self, module: nn.Module, config: RTNConfig) -> None:
        self.module = module
        self.config = config
        self.result: QuantizedWeight | None = None

    def add_batch(self, inp: Tensor) -> None:
        return None

    @torch.no_grad()
    def prune(self) -> None:
        weight = weight_matrix(self.module)
        config = self.config
        self.result = rtn_quantize(
            weight.detach(), weight != 0, config.bits, config.group_size, config.symmetric
        )
        set_weight_matrix(self.module, self.result.dequantize(weight.dtype))


@register("quantizer", "rtn", RTNConfig, summary="round every kept weight to its group's grid; no data")
def rtn_quantizer(name: str, module: nn.Module, config: RTNConfig) -> RTNQuantizer:
    return RTNQuantizer(module, config)
