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

from semisparse import nm
from semisparse.compressed import (
    COMPRESSED_FILE,
    FORMAT,
    FORMAT_VERSION,
    is_compressed_dir,
    load_compressed_with_codes,
    save_compressed,
)
from semisparse.data import calibration_ids
from semisparse.errors import SemisparseError
from semisparse.export import (
    METADATA_FILE,
    atomic_directory,
    ensure_output_available,
    provenance,
    read_metadata,
)
from semisparse.models import context_length, find_targets, load_model, load_tokenizer, weight_matrix
from semisparse.quantization import QuantizedWeight, check_settings, quantize
from semisparse.quantization.gridfile import load_quantized, save_grids
from semisparse.sizes import dir_bytes, size_report
from semisparse.workflows import measured

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
) -> None:
    """Model files, tokenizer, then `semisparse.json` with the on-disk size of what was written."""
    if compressed:
        save_compressed(model, tmp, quantized)
    else:
        model.save_pretrained(tmp, safe_serialization=True)
        if quantized:
            save_grids(quantized, tmp)
    tokenizer.save_pretrained(tmp)
    metadata["on_disk_bytes"] = {"this": dir_bytes(tmp), "source": source_bytes}
    (tmp / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n")


def quantize_to_dir(
    model_dir: str,
    out: str | Path,
    bits: int = 4,
    method: str = "gptq",
    group_size: int | None = 128,
    symmetric: bool = False,
    act_order: bool = True,
    calibration: str = "c4",
    nsamples: int = 128,
    seqlen: int = 2048,
    seed: int = 0,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    compressed: bool = False,
    device: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Quantize a (2:4) model directory's target layers and save it; returns the `semisparse.json` content."""
    ensure_output_available(out, overwrite)
    check_settings(bits, group_size, method)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    source = _source_metadata(model_dir)
    if source.get("quantization"):
        raise SemisparseError(f"{model_dir} is already quantized: quantize its unquantized source instead")
    model, _ = _load(model_dir, device)
    tokenizer = load_tokenizer(model_dir)
    ids, calibration_info = None, None
    if method == "gptq":
        if seqlen > context_length(model):
            raise SemisparseError(f"--seqlen {seqlen} exceeds the model's context: use a smaller --seqlen")
        ids, calibration_info = calibration_ids(tokenizer, calibration, nsamples, seqlen, seed)
    before = _nonzero_masks(model)
    with measured(device) as cost:
        quantized = quantize(
            model,
            bits,
            group_size,
            method,
            ids,
            include,
            exclude,
            symmetric,
            device=device,
            progress=progress,
            act_order=act_order,
        )
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
    settings = {"bits": bits, "group_size": group_size, "method": method, "symmetric": symmetric}
    if method == "gptq":
        settings["act_order"] = act_order
    metadata = provenance(
        **{k: v for k, v in source.items() if k not in _OWN_KEYS},
        source_model=str(model_dir),
        method=f"{source.get('method', 'dense')}+{method}-int{bits}",
        quantization={**settings, "layers": sorted(quantized), "calibration": calibration_info},
        compressed={"format": FORMAT, "version": FORMAT_VERSION} if compressed else None,
        sizes=_sizes(model, quantized),
        quantize_seconds=round(cost.seconds, 2),
        peak_memory_bytes=cost.peak_memory_bytes,
    )
    with atomic_directory(out, overwrite) as tmp:
        _write(model, tokenizer, tmp, metadata, quantized, compressed, dir_bytes(model_dir))
    return metadata


def compress_to_dir(model_dir: str, out: str | Path, overwrite: bool = False) -> dict[str, Any]:
    """Write a 2:4 model directory (quantized or not) in the compressed bitmask layout."""
    ensure_output_available(out, overwrite)
    if is_compressed_dir(model_dir):
        raise SemisparseError(f"{model_dir} is already compressed: pass its dense form, or use decompress")
    model, quantized = _load(model_dir, "cpu")
    source = _source_metadata(model_dir)
    matrices = [weight_matrix(m) for m in find_targets(model).values()]
    if not any(w.shape[1] % 4 == 0 and nm.is_nm(w, 2, 4) for w in matrices):
        raise SemisparseError(f"{model_dir} has no 2:4 layers to compress: prune it with --pattern 2:4 first")
    metadata = {
        **source,
        "compressed": {"format": FORMAT, "version": FORMAT_VERSION, "file": COMPRESSED_FILE},
        "sizes": _sizes(model, quantized),
    }
    with atomic_directory(out, overwrite) as tmp:
        _write(model, load_tokenizer(model_dir), tmp, metadata, quantized, True, dir_bytes(model_dir))
    return metadata


def decompress_to_dir(model_dir: str, out: str | Path, overwrite: bool = False) -> dict[str, Any]:
    """Write a compressed directory back as a plain transformers model (plus grids if quantized)."""
    ensure_output_available(out, overwrite)
    if not is_compressed_dir(model_dir):
        raise SemisparseError(f"{model_dir} is not a compressed model directory: nothing to decompress")
    model, quantized = _load(model_dir, "cpu")
    metadata = {**_source_metadata(model_dir), "compressed": None}
    with atomic_directory(out, overwrite) as tmp:
        _write(model, load_tokenizer(model_dir), tmp, metadata, quantized, False, dir_bytes(model_dir))
    return metadata
