"""Weight-only int8 / int4 quantization that keeps a sparse model's zeros exactly zero.

Only kept (non-zero) weights get codes, and their grid statistics come from kept weights only, so a 2:4
model stays exactly 2:4. The model keeps computing in floating point with the dequantized weights (every
evaluation works unchanged); the returned `QuantizedWeight`s hold the integer codes and grids for export.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from semisparse.errors import SemisparseError
from semisparse.models import find_targets, set_weight_matrix, weight_matrix
from semisparse.pruning.engine import LayerPruner, run_sequential
from semisparse.quantization.gptq import GPTQQuantizer, gptq_quantize_weight
from semisparse.quantization.rtn import QuantizedWeight, rtn_quantize

QUANT_METHODS: tuple[str, ...] = ("rtn", "gptq")
QUANT_BITS: tuple[int, ...] = (4, 8)

__all__ = [
    "QUANT_BITS",
    "QUANT_METHODS",
    "QuantizedWeight",
    "gptq_quantize_weight",
    "quantize",
    "rtn_quantize",
]


def check_settings(bits: int, group_size: int | None, method: str) -> None:
    """Reject unsupported settings up front, each with its fix."""
    if bits not in QUANT_BITS:
        raise SemisparseError(f"--bits {bits} is not supported: use 4 or 8")
    if group_size is not None and group_size <= 0:
        raise SemisparseError(f"--group-size {group_size} must be positive: use e.g. 128 (or omit it)")
    if method not in QUANT_METHODS:
        raise SemisparseError(
            f"unknown quantization method '{method}': use one of {', '.join(QUANT_METHODS)}"
        )


def quantize(
    model: nn.Module,
    bits: int = 4,
    group_size: int | None = 128,
    method: str = "rtn",
    calibration_ids: Tensor | None = None,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    symmetric: bool = False,
    blocksize: int = 128,
    percdamp: float = 0.01,
    device: str | torch.device | None = None,
    progress: bool = True,
    act_order: bool = True,
) -> dict[str, QuantizedWeight]:
    """Quantize the decoder-block linears in place (weights become their dequantized values).

    `group_size` counts dense input columns (None: one grid per output row). GPTQ calibrates block by block
    on `calibration_ids` [n_samples, seqlen] through the same sequential engine as the pruners; `act_order`
    sweeps each layer's columns by decreasing Hessian diagonal with static groups (see `gptq`).
    Returns each target's codes and grid, keyed by module name.
    """
    check_settings(bits, group_size, method)
    targets = find_targets(model, include, exclude)
    if method == "rtn":
        results: dict[str, QuantizedWeight] = {}
        for name, module in targets.items():
            weight = weight_matrix(module)
            results[name] = rtn_quantize(weight.detach(), weight != 0, bits, group_size, symmetric)
            set_weight_matrix(module, results[name].dequantize(weight.dtype))
        return results
    if calibration_ids is None or calibration_ids.dim() != 2 or calibration_ids.numel() == 0:
        raise SemisparseError(
            "GPTQ needs calibration_ids of shape [n_samples, seqlen]: pass calibration data"
        )
    if percdamp < 0:
        raise SemisparseError(f"percdamp {percdamp} is negative: use e.g. 0.01")
    quantizers: dict[str, GPTQQuantizer] = {}

    def make_quantizer(name: str, module: nn.Module) -> LayerPruner:
        quantizers[name] = GPTQQuantizer(
            module, bits, group_size, symmetric, blocksize, percdamp, name, act_order
        )
        return quantizers[name]

    run_sequential(model, targets, make_quantizer, calibration_ids, device, progress, f"gptq int{bits}")
    return {name: quantizer.result for name, quantizer in quantizers.items() if quantizer.result is not None}
