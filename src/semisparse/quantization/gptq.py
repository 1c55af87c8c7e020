"""GPTQ (Frantar et al. 2023) restricted to the kept weights of a sparse layer.

Columns are quantized left to right; each column's rounding error is spread over the not-yet-quantized
columns through row `j` of the upper Cholesky factor of `H⁻¹` (as in SparseGPT, whose Hessian
accumulation and Cholesky helper this reuses). The update is applied to the whole row, but only kept
weights are ever read back (`w * mask`), so pruned weights contribute nothing, stay exactly zero and the
result keeps the layer's N:M pattern. Group grids are fixed when the sweep reaches a group's first column,
from the already-updated kept weights of that group, so they match the values being rounded.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from semisparse.errors import SemisparseError
from semisparse.models import set_weight_matrix, weight_matrix
from semisparse.pruning.sparsegpt import SparseGPTPruner, inverse_hessian_cholesky
from semisparse.quantization.rtn import SCALE_DTYPE, QuantizedWeight, grid_for, move_to, quantize_codes


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
) -> QuantizedWeight:
    """Quantize the kept weights of an [out, in] matrix with GPTQ error compensation, given its Hessian."""
    w_all = torch.where(mask, weight.detach().float(), torch.zeros((), device=weight.device))
    rows, cols = w_all.shape
    if group_size is not None:
        blocksize = group_size * max(1, blocksize // group_size)
    h = hessian.detach().to(device=w_all.device, dtype=torch.float32).clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1
    torch.diagonal(h).add_(percdamp * torch.diagonal(h).mean())
    hinv = inverse_hessian_cholesky(h, layer_name)
    del h

    maskf = mask.float()
    codes = torch.zeros(rows, cols, dtype=torch.uint8, device=w_all.device)
    midpoint = torch.full((rows, 1), float(2 ** (bits - 1)), device=w_all.device)
    scales: list[Tensor] = []
    zeros: list[Tensor] = []

    def new_grid(w: Tensor, m: Tensor) -> tuple[Tensor, Tensor]:
        scale, zero = grid_for(w, m, bits, symmetric)
        zero = midpoint if zero is None else zero
        scales.append(scale)
        zeros.append(zero)
        return scale, zero

    if group_size is None:
        scale, zero = new_grid(w_all, mask)
    for start in range(0, cols, blocksize):
        end = min(start + blocksize, cols)
        w_block = w_all[:, start:end].clone()
        m_block = maskf[:, start:end]
        err_block = torch.zeros_like(w_block)
        hinv_block = hinv[start:end, start:end]
        for j in range(end - start):
            if group_size is not None and (start + j) % group_size == 0:
                group = slice(j, j + group_size)
                scale, zero = new_grid(w_block[:, group] * m_block[:, group], mask[:, start:end][:, group])
            w = w_block[:, j : j + 1] * m_block[:, j : j + 1]
            q = quantize_codes(w, scale, zero, bits) * m_block[:, j : j + 1]
            dequantized = (q - zero) * scale * m_block[:, j : j + 1]
            codes[:, start + j] = q.squeeze(1).to(torch.uint8)
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
    ) -> None:
        super().__init__(module, None, None, blocksize, percdamp, name)
        self.bits = bits
        self.group_size = group_size
        self.symmetric = symmetric
        self.result: QuantizedWeight | None = None

    @torch.no_grad()
    def prune(self) -> None:
        if self.n_samples == 0:
            raise SemisparseError(
                f"GPTQ saw no inputs for {self.name}: the model never calls it, use --exclude"
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
        )
        set_weight_matrix(self.module, self.result.dequantize(weight.dtype))
        self.result = move_to(self.result, torch.device("cpu"))
        self.hessian = torch.empty(0)  # every layer's quantizer lives until the end: drop its big matrix
