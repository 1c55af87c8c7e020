"""Honest model-size accounting for sparse (and quantized) models.

The popular "16× smaller than dense fp32" for 2:4 + int4 counts only the kept values (4 bits × half the
weights vs 32 bits × all). A deployable model also stores which weights are kept, and the quantization
grids. This module counts, over the pruned target layers:

- values: kept weights at their storage width (the quantization bits, else the weight dtype's width);
- 2:4 metadata, two ways: the hardware (cuSPARSELt/CUTLASS) format's 2 bits per kept value, and the
  bitmask checkpoint layout's 1 bit per dense weight (`semisparse.compressed`);
- grids: one float16 scale per row and group, plus one uint8 zero point when asymmetric (as stored);

and compares with the same layers dense in fp32 and bf16. Layers that are not 2:4 count all their
weights as values and carry no metadata. Parameters outside the targets (embeddings, norms, head) are
reported separately, at their own dtype.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from semisparse import nm
from semisparse.compressed import is_compressed_dir, load_compressed_with_codes
from semisparse.models import load_model
from semisparse.modules import find_targets, weight_matrix
from semisparse.quantization.gridfile import load_quantized
from semisparse.quantization.rtn import QuantizedWeight, n_groups


@dataclass
class LayerSize:
    name: str
    shape: tuple[int, int]
    is_24: bool
    kept: int
    value_bits: int
    grid_bytes: int


@dataclass
class SizeReport:
    layers: list[LayerSize] = field(default_factory=list)
    other_bytes: int = 0  # parameters outside the target layers, at their dtype

    @property
    def weights(self) -> int:
        return sum(layer.shape[0] * layer.shape[1] for layer in self.layers)

    def totals(self) -> dict[str, int]:
        """Byte counts of the target layers (bits rounded up to whole bytes per component)."""
        value_bits = sum(layer.kept * layer.value_bits for layer in self.layers)
        hw_bits = sum(2 * layer.kept for layer in self.layers if layer.is_24)
        bitmask_bits = sum(layer.shape[0] * layer.shape[1] for layer in self.layers if layer.is_24)
        return {
            "dense_fp32": 4 * self.weights,
            "dense_bf16": 2 * self.weights,
            "values": -(-value_bits // 8),
            "metadata_hw_2bit_per_kept": -(-hw_bits // 8),
            "metadata_bitmask_1bit_per_weight": -(-bitmask_bits // 8),
            "grids": sum(layer.grid_bytes for layer in self.layers),
        }

    def ratios(self) -> dict[str, float]:
        """How many times smaller than dense the target layers are, with and without the overheads."""
        t = self.totals()
        variants = {
            "values_only": t["values"],
            "values_grids_hw_metadata": t["values"] + t["grids"] + t["metadata_hw_2bit_per_kept"],
            "values_grids_bitmask": t["values"] + t["grids"] + t["metadata_bitmask_1bit_per_weight"],
        }
        out = {}
        for reference in ("dense_fp32", "dense_bf16"):
            for variant, size in variants.items():
                out[f"{reference}/{variant}"] = t[reference] / size if size else float("inf")
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "targets": len(self.layers),
            "weights": self.weights,
            "bytes": self.totals(),
            "other_parameter_bytes": self.other_bytes,
            "times_smaller": {key: round(value, 3) for key, value in self.ratios().items()},
            "layers": [asdict(layer) for layer in self.layers],
        }

    def markdown(self) -> str:
        """The size table for a README or benchmark record."""
        t = self.totals()
        overheads = t["values"] + t["grids"]
        rows = [
            ("dense fp32", t["dense_fp32"]),
            ("dense bf16", t["dense_bf16"]),
            ("kept values only (the '16×' count)", t["values"]),
            ("+ grids + 2:4 hardware metadata (2 bits/kept)", overheads + t["metadata_hw_2bit_per_kept"]),
            (
                "+ grids + bitmask (1 bit/weight, checkpoint)",
                overheads + t["metadata_bitmask_1bit_per_weight"],
            ),
        ]
        lines = ["| target layers stored as | MiB | × smaller than fp32 | × smaller than bf16 |"]
        lines.append("|---|---:|---:|---:|")
        for label, size in rows:
            fp32, bf16 = t["dense_fp32"] / size, t["dense_bf16"] / size
            lines.append(f"| {label} | {size / 2**20:.2f} | {fp32:.2f} | {bf16:.2f} |")
        return "\n".join(lines)


def size_report(
    model: nn.Module | str | Path, quantized: dict[str, QuantizedWeight] | None = None
) -> SizeReport:
    """Size accounting of a model (or model directory, compressed or not) and its quantization grids.

    For a directory, the grids come from the directory itself (`quantization.safetensors` or the
    compressed file); for a model in memory, pass `quantize()`'s result as `quantized`.
    """
    if isinstance(model, str | Path):
        model, quantized = load_with_grids(model)
    quantized = quantized or {}
    report = SizeReport()
    targets = find_targets(model)
    for name, module in targets.items():
        w = weight_matrix(module)
        rows, cols = w.shape
        is_24 = nm.is_nm(w, 2, 4)
        kept = rows * cols // 2 if is_24 else rows * cols
        q = quantized.get(name)
        if q is None:
            report.layers.append(LayerSize(name, (rows, cols), is_24, kept, w.element_size() * 8, 0))
            continue
        groups = rows * n_groups(cols, q.group_size)
        grid = groups * 2 + (groups if q.zeros is not None else 0)
        report.layers.append(LayerSize(name, (rows, cols), is_24, kept, q.bits, grid))
    target_weights = {id(module.weight) for module in targets.values()}
    report.other_bytes = sum(
        p.numel() * p.element_size() for p in model.parameters() if id(p) not in target_weights
    )
    return report


def load_with_grids(path: str | Path) -> tuple[nn.Module, dict[str, QuantizedWeight]]:
    """A model directory (compressed or not) in float32 with the codes of its quantized layers."""
    if is_compressed_dir(path):
        return load_compressed_with_codes(path)
    model = load_model(str(path))
    return model, load_quantized(model, path)


def dir_bytes(path: str | Path) -> int:
    """Bytes of the tensor files of a model directory (`*.safetensors`), what 'on-disk size' compares."""
    return sum(f.stat().st_size for f in Path(path).expanduser().glob("*.safetensors"))
