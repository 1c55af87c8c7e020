"""Jobs behind `semisparse quantize`, `compress` and `decompress`: load, transform, save atomically.

A quantized directory holds dequantized float32 weights (plain transformers loads it, every evaluation
works unchanged) and the grids in `quantization.safetensors`; a compressed directory holds the 2:4
bitmask layout of `semisparse.compressed`. Both carry `semisparse.json` with the sizes.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from semisparse import nm, registry
from semisparse.calibration import Calibration, load_calibration
from semisparse.compressed import (
    COMPRESSED_FILE,
    FORMAT,
    FORMAT_VERSION,
    is_compressed_dir,
    load_compressed_with_codes,
    save_compressed,
)
from semisparse.compressed_tensors import (
    LIBRARY_VERSION,
    SPARSITY_FORMAT,
    WEIGHTS_FILE,
    is_compressed_tensors_dir,
    save_compressed_tensors,
)
from semisparse.errors import SemisparseError
from semisparse.export import (
    METADATA_FILE,
    atomic_directory,
    ensure_output_available,
    provenance,
    read_metadata,
    writes_output,
)
from semisparse.models import load_model, load_tokenizer, model_provenance
from semisparse.modules import find_targets, layer_filter, weight_matrix
from semisparse.quantization import QuantizedWeight, QuantizerConfig, quantize
from semisparse.quantization.gridfile import load_quantized, save_grids
from semisparse.runtime import default_device, measured
from semisparse.sizes import dir_bytes, size_report

COMPRESS_FORMATS = ("semisparse", "compressed-tensors")

# Fields of the source's semisparse.json that the new provenance header replaces.
_OWN_KEYS = (
    "semisparse_format",
    "versions",
    "command",
    "created",
    "method",
    "sizes",
    "on_disk_bytes",
    "peak_memory_bytes",
)


def _load(model_dir: str, device: str) -> tuple[PreTrainedModel, dict[str, QuantizedWeight]]:
    """A model directory (compressed or not) in float32, with the codes of already-quantized layers."""
    if is_compressed_dir(model_dir):
        model, quantized = load_compressed_with_codes(model_dir, torch.float32, device)
        return model, quantized
    model = load_model(model_dir, dtype=torch.float32, device=device)
    return model, load_quantized(model, model_dir)


def _source_metadata(model_dir: str) -> dict[str, Any]:
    return (read_metadata(model_dir) if Path(model_dir).expanduser().is_dir() else None) or {}


def _identity(model_dir: str, source: dict[str, Any]) -> dict[str, Any]:
    """`source_model` as given, resolved and by its weights' sha256; also as `base_model` when the source
    names none (a dense model is its own base)."""
    found = model_provenance(model_dir, "source_model")
    if source.get("base_model") is None:
        found.update(model_provenance(model_dir, "base_model"))
    return found


def _nonzero_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: weight_matrix(m) != 0 for name, m in find_targets(model).items()}


def _sizes(model: nn.Module, quantized: dict[str, QuantizedWeight]) -> dict[str, Any]:
    report = size_report(model, quantized).to_dict()
    report.pop("layers")
    return report


def _write(
    model: PreTrainedModel,
    tokenizer: Any,
    tmp: Path,
    metadata: dict[str, Any],
    quantized: dict[str, QuantizedWeight],
    compressed: bool,
    source_bytes: int,
    compressed_tensors: bool = False,
) -> None:
    """Model files, tokenizer, then `semisparse.json` with the on-disk size of what was written."""
    if compressed and compressed_tensors:
        save_compressed_tensors(model, tmp)
    elif compressed:
        save_compressed(model, tmp, quantized)
    else:
        model.save_pretrained(tmp, safe_serialization=True)
        if quantized:
            save_grids(quantized, tmp)
    tokenizer.save_pretrained(tmp)
    metadata["on_disk_bytes"] = {"this": dir_bytes(tmp), "source": source_bytes}
    (tmp / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n")


@writes_output()
def quantize_to_dir(
    model_dir: str,
    out: str | Path,
    config: QuantizerConfig,
    calibration: Calibration | None = None,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    compressed: bool = False,
    device: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Quantize a (2:4) model directory's target layers and save it; returns the `semisparse.json` content.

    The metadata keeps the source's provenance and names the source as given, resolved and by the sha256
    of its weights (`source_model*`); a source without a `base_model` (a dense model) is also the base.
    """
    ensure_output_available(out, overwrite)
    entry = registry.for_config(config, "quantizer")
    device = device or default_device()
    source = _source_metadata(model_dir)
    if source.get("quantization"):
        raise SemisparseError(f"{model_dir} is already quantized: quantize its unquantized source instead")
    model, _ = _load(model_dir, device)
    tokenizer = load_tokenizer(model_dir)
    identity = _identity(model_dir, source)
    ids, calibration_info = None, None
    if entry.needs_calibration:
        ids, calibration_info = load_calibration(model, tokenizer, calibration or Calibration())
    before = _nonzero_masks(model)
    with measured(device) as cost:
        quantized = quantize(model, config, layer_filter(include, exclude), ids, device, progress)
    for name, mask in _nonzero_masks(model).items():
        if bool((mask & ~before[name]).any()):
            raise SemisparseError(f"internal error: quantization of {name} filled a pruned weight")
    pattern = source.get("pattern")
    if pattern is not None:
        parsed = nm.parse_pattern(pattern)
        broken = [
            n for n, m in find_targets(model).items() if not nm.is_nm(weight_matrix(m), parsed.n, parsed.m)
        ]
        if broken:
            raise SemisparseError(
                f"internal error: {broken[0]} no longer follows {pattern} after quantization"
            )
    settings = {"method": entry.name, **config.to_dict()}
    metadata = provenance(
        **{k: v for k, v in source.items() if k not in _OWN_KEYS and k not in identity},
        **identity,
        method=f"{source.get('method', 'dense')}+{entry.name}-int{config.bits}",
        quantization={**settings, "layers": sorted(quantized), "calibration": calibration_info},
        compressed={"format": FORMAT, "version": FORMAT_VERSION} if compressed else None,
        sizes=_sizes(model, quantized),
        quantize_seconds=round(cost.seconds, 2),
        peak_memory_bytes=cost.peak_memory_bytes,
    )
    with atomic_directory(out, overwrite) as tmp:
        _write(model, tokenizer, tmp, metadata, quantized, compressed, dir_bytes(model_dir))
    return metadata


@writes_output()
def compress_to_dir(
    model_dir: str, out: str | Path, overwrite: bool = False, format: str = "semisparse"
) -> dict[str, Any]:
    """Write a 2:4 model directory in a compressed bitmask layout.

    `format` "semisparse" (default) is `semisparse.compressed` (quantized or not, Linear or Conv1D);
    "compressed-tensors" is that library's sparse-24-bitmask (`semisparse.compressed_tensors`): unquantized
    Linear layers only, loadable by compressed-tensors 0.14.0.1 with transformers 4.57.
    """
    if format not in COMPRESS_FORMATS:
        raise SemisparseError(f"unknown `format` {format!r}: choose from {', '.join(COMPRESS_FORMATS)}")
    ensure_output_available(out, overwrite)
    ct = format == "compressed-tensors"
    if is_compressed_tensors_dir(model_dir) if ct else is_compressed_dir(model_dir):
        raise SemisparseError(f"{model_dir} is already compressed: pass its dense form, or use decompress")
    model, quantized = _load(model_dir, "cpu")
    source = _source_metadata(model_dir)
    if ct and (quantized or source.get("quantization")):
        raise SemisparseError(
            f"{model_dir} is quantized: `format` compressed-tensors writes unquantized 2:4 models only "
            "(the semisparse format stores packed int4/int8 codes)"
        )
    matrices = [weight_matrix(m) for m in find_targets(model).values()]
    if not any(nm.is_nm(w, 2, 4) for w in matrices):
        raise SemisparseError(f"{model_dir} has no 2:4 layers to compress: prune it to 2:4 first")
    written = (
        {"format": f"compressed-tensors/{SPARSITY_FORMAT}", "version": LIBRARY_VERSION, "file": WEIGHTS_FILE}
        if ct
        else {"format": FORMAT, "version": FORMAT_VERSION, "file": COMPRESSED_FILE}
    )
    metadata = {
        **source,
        **_identity(model_dir, source),
        "compressed": written,
        "sizes": _sizes(model, quantized),
    }
    tokenizer = load_tokenizer(model_dir)
    with atomic_directory(out, overwrite) as tmp:
        _write(model, tokenizer, tmp, metadata, quantized, True, dir_bytes(model_dir), ct)
    return metadata


@writes_output()
def decompress_to_dir(model_dir: str, out: str | Path, overwrite: bool = False) -> dict[str, Any]:
    """Write a compressed directory back as a plain transformers model (plus grids if quantized)."""
    ensure_output_available(out, overwrite)
    if not (is_compressed_dir(model_dir) or is_compressed_tensors_dir(model_dir)):
        raise SemisparseError(f"{model_dir} is not a compressed model directory: nothing to decompress")
    model, quantized = _load(model_dir, "cpu")
    metadata = {**_source_metadata(model_dir), "compressed": None}
    with atomic_directory(out, overwrite) as tmp:
        _write(model, load_tokenizer(model_dir), tmp, metadata, quantized, False, dir_bytes(model_dir))
    return metadata
