"""Weight-only int8 / int4 quantization that keeps a sparse model's zeros exactly zero.

Only kept (non-zero) weights get codes, and their grid statistics come from kept weights only, so a 2:4
model stays exactly 2:4. The model keeps computing in floating point with the dequantized weights (every
evaluation works unchanged); the returned `QuantizedWeight`s hold the integer codes and grids for export.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from semisparse import registry
from semisparse.modules import FilterFn, find_targets
from semisparse.pruning.engine import LayerPruner, check_calibration_ids, run_layerwise
from semisparse.quantization.config import QuantizerConfig
from semisparse.quantization.gptq import GPTQConfig, gptq_quantize_weight
from semisparse.quantization.rtn import QuantizedWeight, RTNConfig, rtn_quantize

__all__ = [
    "GPTQConfig",
    "QuantizedWeight",
    "QuantizerConfig",
    "RTNConfig",
    "gptq_quantize_weight",
    "quantize",
    "quantizer_config",
    "rtn_quantize",
]


def quantizer_config(method: str, **settings: Any) -> QuantizerConfig:
    """The config of the quantizer registered as `method`, from plain values (a recipe, CLI flags)."""
    return registry.lookup("quantizer", method).config.from_mapping(settings)


def quantize(
    model: nn.Module,
    config: QuantizerConfig,
    filter_fn: FilterFn | None = None,
    calibration_ids: Tensor | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> dict[str, QuantizedWeight]:
    """Quantize the decoder-block linears in place (weights become their dequantized values).

    `group_size` counts dense input columns (None: one grid per output row). A quantizer that needs data
    (GPTQ) calibrates block by block on `calibration_ids` [n_samples, seqlen] through the same sequential
    engine as the pruners. Returns each target's codes and grid, keyed by module name.
    """
    entry = registry.for_config(config, "quantizer")
    ids = check_calibration_ids(entry.name, calibration_ids) if entry.needs_calibration else None
    targets = find_targets(model, filter_fn)
    quantizers: dict[str, Any] = {}

    def make_quantizer(name: str, module: nn.Module) -> LayerPruner:
        quantizers[name] = entry.implementation(name, module, config)
        return quantizers[name]

    run_layerwise(model, targets, make_quantizer, ids, device, progress, f"{entry.name} int{config.bits}")
    return {name: q.result for name, q in quantizers.items() if q.result is not None}
