"""The prune and info jobs: load a model, prune it one-shot, save it with its provenance; report sparsity.

Each function takes plain values (model names, paths, configs), so the CLI stays a thin translation of
flags, and the same jobs can be scripted from Python.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from semisparse import compressed_tensors, nm, registry
from semisparse.calibration import Calibration
from semisparse.errors import SemisparseError
from semisparse.export import (
    ensure_output_available,
    provenance,
    read_metadata,
    save_model_dir,
    writes_output,
)
from semisparse.models import load_model, load_tokenizer, model_provenance
from semisparse.modules import layer_filter
from semisparse.pruning import PrunerConfig, calibrate_and_prune
from semisparse.report import SparsityReport, sparsity_report
from semisparse.runtime import default_device, measured, parse_dtype


@writes_output()
def prune_to_dir(
    model_name: str,
    out: str | Path,
    config: PrunerConfig,
    calibration: Calibration | None = None,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    device: str | None = None,
    dtype: str = "float32",
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Prune a model one-shot and save it with its provenance; returns the `semisparse.json` content.

    `include` / `exclude` are globs on layer names (recorded, so `inspect_model` checks the same layers).
    `out` is checked (it must not exist unless `overwrite`, and must be writable) and locked against other
    writers before the model is loaded. The metadata names the model as given, its resolved directory and
    the sha256 of its weights (`models.model_provenance`).
    """
    ensure_output_available(out, overwrite)
    entry = registry.for_config(config, "pruner")
    calibration = calibration or Calibration()
    device = device or default_device()
    model = load_model(model_name, dtype=parse_dtype(dtype), device=device)
    tokenizer = load_tokenizer(model_name)
    base = model_provenance(model_name)
    with measured(device) as cost:
        per_layer, calibration_info = calibrate_and_prune(
            model, tokenizer, config, calibration, layer_filter(include, exclude), device, progress
        )
    parsed = config.nm_pattern
    report = sparsity_report(model, parsed, include, exclude)
    if report.violations:
        raise SemisparseError(
            f"internal error: {report.violations[0]} does not follow {parsed} after pruning"
        )
    settings = {key: value for key, value in config.to_dict().items() if key not in ("pattern", "sparsity")}
    metadata = provenance(
        **base,
        method=entry.name,
        pattern=config.pattern,
        sparsity=config.sparsity,
        targets=list(per_layer),
        include=list(include),
        exclude=list(exclude),
        overall_sparsity=report.overall_sparsity,
        per_layer_sparsity=per_layer,
        calibration=calibration_info,
        settings={**settings, "dtype": dtype, "device": device},
        seed=calibration.seed,
        prune_seconds=round(cost.seconds, 2),
        peak_memory_bytes=cost.peak_memory_bytes,
    )
    save_model_dir(model, tokenizer, out, metadata, overwrite=overwrite)
    return metadata


def inspect_model(model_name: str, pattern: str | None = None) -> SparsityReport:
    """Sparsity of a saved model's targets, verified against `pattern` or the one it was saved with."""
    meta = read_metadata(model_name) if Path(model_name).expanduser().is_dir() else None
    pattern = pattern or (meta or {}).get("pattern")
    model = load_model(model_name)
    include = (meta or {}).get("include", ())
    exclude = (meta or {}).get("exclude", ())
    if meta is None and compressed_tensors.is_compressed_tensors_dir(model_name):
        saved, left_out = compressed_tensors.saved_pattern(model_name, model)  # written by the library
        pattern, exclude = pattern or saved, left_out
    return sparsity_report(model, nm.parse_pattern(pattern) if pattern else None, include, exclude)
