"""One-shot pruners (magnitude, Wanda, SparseGPT) to N:M or unstructured sparsity.

Each pruner is a config registered with its layer pruner (`semisparse.registry`), in the shape torchao
made familiar: `prune(model, SparseGPTConfig(pattern="2:4"), filter_fn=..., calibration_ids=ids)`.
Pruners that need data run through the sequential calibration engine; the others prune layer by layer.
`calibrate_and_prune` adds the calibration windows for a tokenizer, the step every job shares.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from semisparse import nm, registry
from semisparse.calibration import Calibration, load_calibration
from semisparse.errors import SemisparseError
from semisparse.modules import FilterFn, find_targets, weight_matrix
from semisparse.pruning.config import PrunerConfig
from semisparse.pruning.engine import LayerPruner, PruneTimings, check_calibration_ids, run_layerwise
from semisparse.pruning.magnitude import MagnitudeConfig
from semisparse.pruning.sparsegpt import SparseGPTConfig
from semisparse.pruning.wanda import WandaConfig

__all__ = [
    "MagnitudeConfig",
    "PrunerConfig",
    "SparseGPTConfig",
    "WandaConfig",
    "calibrate_and_prune",
    "prune",
    "pruner_config",
]


def pruner_config(method: str, **settings: Any) -> PrunerConfig:
    """The config of the pruner registered as `method`, from plain values (a recipe, CLI flags)."""
    return registry.lookup("pruner", method).config.from_mapping(settings)


def prune(
    model: nn.Module,
    config: PrunerConfig,
    filter_fn: FilterFn | None = None,
    calibration_ids: Tensor | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
    timings: PruneTimings | None = None,
) -> dict[str, float]:
    """Prune the model's decoder-block linears in place; returns each target's fraction of zeros.

    `filter_fn(module, name)` picks the targets among the decoder-block linears (all by default;
    `semisparse.modules.layer_filter` builds one from globs). Pruners that need data calibrate
    sequentially on `calibration_ids` [n_samples, seqlen]; `timings`, if given, records where that time
    went (`semisparse.pruning.engine.PruneTimings`).
    """
    entry = registry.for_config(config, "pruner")
    pattern = config.nm_pattern
    kind = "nm" if pattern is not None else "unstructured"
    if kind not in entry.patterns:
        raise SemisparseError(f"{entry.name} does not support {kind} sparsity: use another pruner")
    ids = check_calibration_ids(entry.name, calibration_ids) if entry.needs_calibration else None
    targets = find_targets(model, filter_fn, m=pattern.m if pattern is not None else None)

    def make_pruner(name: str, module: nn.Module) -> LayerPruner:
        return entry.implementation(name, module, config)

    desc = f"{entry.name} {config.target}"
    run_layerwise(model, targets, make_pruner, ids, device, progress, desc, timings)
    return {name: nm.sparsity(weight_matrix(module)) for name, module in targets.items()}


def calibrate_and_prune(
    model: nn.Module,
    tokenizer: Any,
    config: PrunerConfig,
    calibration: Calibration | None = None,
    filter_fn: FilterFn | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> tuple[dict[str, float], dict[str, Any] | None]:
    """Load calibration windows when the pruner needs them, then prune; returns per-layer sparsity and
    the calibration provenance (None for a data-free pruner)."""
    ids, info = None, None
    if registry.for_config(config, "pruner").needs_calibration:
        ids, info = load_calibration(model, tokenizer, calibration or Calibration())
    return prune(model, config, filter_fn, ids, device, progress), info
