"""GPTQ (Frantar et al. 2023) restricted to the kept weights of a sparse layer.

Columns are quantized one at a time, by default in decreasing order of the Hessian diagonal ("act order");
each column's rounding error is spread over the not-yet-quantized columns through row `j` of the upper
Cholesky factor of `H⁻¹` (as in SparseGPT, whose Hessian accumulation and Cholesky helper this reuses). The
update reaches pruned positions too, so as in SparseGPT's joint prune+quantize a pruned weight is "quantized"
to exactly 0 when the sweep reaches it and the drift accumulated there is propagated like any other column's
error (discarding it is not the OBS update: at 3 bits on correlated inputs that was no better than RTN).
Pruned weights come out exactly zero and the result keeps the layer's N:M pattern. With act order, group
grids are fixed from the original weights before the sweep ("static groups", so scales stay per contiguous
group); in natural order a group's grid is fixed when the sweep reaches its first column, from the already-
updated kept weights. Measured perplexities: `benchmarks/results/quantize_smollm2_cpu.md`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from semisparse.errors import SemisparseError
from semisparse.modules import set_weight_matrix, weight_matrix
from semisparse.pruning.sparsegpt import SparseGPTPruner, inverse_hessian_cholesky
from semisparse.quantization.config import QuantizerConfig
from semisparse.quantization.rtn import SCALE_DTYPE, QuantizedWeight, grid_for, move_to, quantize_codes
from semisparse.registry import register
from semisparse.settings import setting


@torch.no_grad()
def gptq_quantize_weight(
    weight: Tensor,
    mask: Tensor,
    hessian: Tensor,
    bits: int,
    group_size: int | None,
    symmetric: bool = False,
    blocksize: int = 128,
    percdamp: float = 0.01,
    layer_name: str = "layer",
    act_order: bool = True,
) -> QuantizedWeight:
    """Quantize the kept weights of an [out, in] matrix with GPTQ error compensation, given its Hessian.

    `act_order` sweeps the columns by decreasing Hessian diagonal (the inputs with the largest activations
    first, while the most columns are left to absorb their error) with static groups: every group's grid
    is fixed from the original weights before the sweep, so groups stay contiguous columns in storage.
    """
    w_all = torch.where(mask, weight.detach().float(), torch.zeros((), device=weight.device))
    rows, cols = w_all.shape
    h = hessian.detach().to(device=w_all.device, dtype=torch.float32).clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1
    torch.diagonal(h).add_(percdamp * torch.diagonal(h).mean())

    size = cols if group_size is None else group_size
    if group_size is not None:
        blocksize = group_size * max(1, blocksize // group_size)
    scales: list[Tensor] = []
    zeros: list[Tensor] = []

    def add_grid(w: Tensor, m: Tensor) -> None:
        scale, zero = grid_for(w, m, bits, symmetric)
        scales.append(scale)
        zeros.append(torch.full_like(scale, 2 ** (bits - 1)) if zero is None else zero)

    # Act order needs every grid before the sweep (static groups), and so does one grid per row.
    static = act_order or group_size is None
    if static:
        for first in range(0, cols, size):
            add_grid(w_all[:, first : first + size], mask[:, first : first + size])
    maskf = mask.float()
    columns = list(range(cols))
    if act_order:
        order = torch.argsort(torch.diagonal(h), descending=True)
        w_all, maskf, h = w_all[:, order], maskf[:, order], h[order][:, order]
        columns = order.tolist()
    hinv = inverse_hessian_cholesky(h, layer_name)
    del h

    codes = torch.zeros(rows, cols, dtype=torch.uint8, device=w_all.device)
    for start in range(0, cols, blocksize):
        end = min(start + blocksize, cols)
        w_block = w_all[:, start:end].clone()
        m_block = maskf[:, start:end]
        err_block = torch.zeros_like(w_block)
        hinv_block = hinv[start:end, start:end]
        for j in range(end - start):
            column = columns[start + j]
            if not static and column % size == 0:
                group = slice(j, j + size)
                add_grid(w_block[:, group] * m_block[:, group], m_block[:, group] > 0)
            scale, zero = scales[column // size], zeros[column // size]
            # A pruned weight is "quantized" to exactly 0: the drift earlier columns pushed into it is its
            # error, propagated like any other column's (dropping it would not be the OBS update).
            w = w_block[:, j : j + 1]
            keep = m_block[:, j : j + 1]
            q = quantize_codes(w, scale, zero, bits) * keep
            dequantized = (q - zero) * scale * keep
            codes[:, column] = q.squeeze(1).to(torch.uint8)
            err = (w - dequantized).squeeze(1) / hinv_block[j, j]
            w_block[:, j + 1 :].addr_(err, hinv_block[j, j + 1 :], alpha=-1)  # in place: the hot loop
            err_block[:, j] = err
        w_all[:, end:] -= err_block @ hinv[start:end, end:]
    return QuantizedWeight(
        codes=codes,
        mask=mask.clone(),
        scales=torch.cat(scales, dim=1).to(SCALE_DTYPE),
        zeros=None if symmetric else torch.cat(zeros, dim=1).to(torch.uint8),
        bits=bits,
        group_size=group_size,
    )


class GPTQQuantizer(SparseGPTPruner):
    """Engine-facing quantizer: SparseGPT's Hessian accumulation, then a masked GPTQ sweep on `prune()`.

    The engine calls `prune()` per layer; the layer's weight becomes its dequantized values and the codes
    are kept in `result` for export.
    """

    def __init__(
        self,
        module: nn.Module,
        bits: int,
        group_size: int | None,
        symmetric: bool,
        blocksize: int,
        percdamp: float,
        name: str,
        act_order: bool = True,
    ) -> None:
        super().__init__(module, None, None, blocksize, percdamp, name)
        self.act_order = act_order
        self.bits = bits
        self.group_size = group_size
        self.symmetric = symmetric
        self.result: QuantizedWeight | None = None

    @torch.no_grad()
    def prune(self) -> None:
        if self.n_samples == 0:
            raise SemisparseError(
                f"GPTQ saw no inputs for {self.name}: the model never calls it, leave it out with `exclude`"
            )
        weight = weight_matrix(self.module)
        self.result = gptq_quantize_weight(
            weight,
            weight != 0,
            self.hessian,
            self.bits,
            self.group_size,
            self.symmetric,
            self.blocksize,
            self.percdamp,
            self.name,
            self.act_order,
        )
        set_weight_matrix(self.module, self.result.dequantize(weight.dtype))
        self.result = move_to(self.result, torch.device("cpu"))
        self.hessian = torch.empty(0)  # every layer's quantizer lives until the end: drop its big matrix


@dataclass
class GPTQConfig(QuantizerConfig):
    """GPTQ restricted to the kept weights: error compensation on the layer's calibration Hessian."""

    owner: ClassVar[str] = "gptq"

    act_order: bool = setting(True, "sweep columns by decreasing Hessian diagonal, with static groups")
    blocksize: int = setting(128, "columns per lazy-update block", minimum=1)
    percdamp: float = setting(0.01, "Hessian diagonal dampening, as a fraction of its mean", minimum=0)


@register(
    "quantizer",
    "gptq",
    GPTQConfig,
    summary="quantize the kept weights column by column with error compensation",
    needs_calibration=True,
    updates_kept_weights=True,
)
def gptq_quantizer(name: str, module: nn.Module, config: GPTQConfig) -> GPTQQuantizer:
    return GPTQQuantizer(
        module,
        config.bits,
        config.group_size,
        config.symmetric,
        config.blocksize,
        config.percdamp,
        name,
        config.act_order,
    )
