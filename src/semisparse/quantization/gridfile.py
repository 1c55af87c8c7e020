"""The grids of a dequantized model directory (`quantization.safetensors`), and codes recovered from them.

`semisparse quantize` saves the model with dequantized float weights (plain transformers loads it) and
the per-layer grids beside them: `<layer>.scales` float16 [out, groups] and, for asymmetric grids,
`<layer>.zeros` uint8 [out, groups]; the header metadata `layers` (JSON) gives each layer's `bits`,
`group_size` and `symmetric`. Codes are not stored: they are recovered exactly from the weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from semisparse.errors import SemisparseError
from semisparse.modules import find_targets, weight_matrix
from semisparse.quantization.rtn import QuantizedWeight, expand_groups, grid_zeros, n_groups

GRID_FILE = "quantization.safetensors"


def recover_codes(weight: Tensor, mask: Tensor, grid: QuantizedWeight) -> QuantizedWeight:
    """Codes on `grid` that reproduce `weight` exactly at `mask` (kept zeros code the zero point).

    Fails loudly if the weight is not on the grid (e.g. saved in another dtype), since an export built on
    such codes would not be lossless.
    """
    weight = weight.detach()
    cols = weight.shape[1]
    scale = expand_groups(grid.scales.float(), cols, grid.group_size)
    zero = expand_groups(grid_zeros(grid), cols, grid.group_size)
    codes = torch.round(weight.float() / scale + zero).clamp(0, 2**grid.bits - 1)
    codes = torch.where(mask, codes, torch.zeros_like(codes)).to(torch.uint8)
    rebuilt = QuantizedWeight(codes, mask, grid.scales, grid.zeros, grid.bits, grid.group_size)
    if not torch.equal(rebuilt.dequantize(weight.dtype), weight):
        raise SemisparseError(
            "quantized weights are not on their saved grid (saved in another dtype?): "
            "use the float32 output of `semisparse quantize`, or quantize again with `compressed` on"
        )
    return rebuilt


def save_grids(quantized: dict[str, QuantizedWeight], directory: Path) -> None:
    tensors: dict[str, Tensor] = {}
    layers = {}
    for name, qw in quantized.items():
        tensors[f"{name}.scales"] = qw.scales.detach().cpu().contiguous()
        if qw.zeros is not None:
            tensors[f"{name}.zeros"] = qw.zeros.detach().cpu().contiguous()
        layers[name] = {"bits": qw.bits, "group_size": qw.group_size, "symmetric": qw.zeros is None}
    save_file(tensors, str(directory / GRID_FILE), metadata={"layers": json.dumps(layers)})


def load_quantized(model: nn.Module, directory: str | Path) -> dict[str, QuantizedWeight]:
    """Codes and grids of a dequantized model directory's layers ({} when it has no grid file)."""
    path = Path(directory).expanduser() / GRID_FILE
    if not path.is_file():
        return {}
    try:
        with safe_open(str(path), framework="pt") as handle:
            layers = json.loads((handle.metadata() or {}).get("layers", "{}"))
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError) as err:
        raise SemisparseError(f"{path} is unreadable ({err}): re-run `semisparse quantize`") from err
    targets = find_targets(model)
    result = {}
    for name, info in layers.items():
        if name not in targets or f"{name}.scales" not in tensors:
            raise SemisparseError(f"{path} has a grid for {name}, which the model lacks: re-run quantize")
        weight = weight_matrix(targets[name]).detach().cpu()
        scales = tensors[f"{name}.scales"]
        zeros = None if info["symmetric"] else tensors.get(f"{name}.zeros")
        expected = (weight.shape[0], n_groups(weight.shape[1], info["group_size"]))
        if tuple(scales.shape) != expected or (not info["symmetric"] and zeros is None):
            raise SemisparseError(f"{path}: the grid of {name} does not fit its weight: re-run quantize")
        grid = QuantizedWeight(
            torch.empty(0), torch.empty(0), scales, zeros, info["bits"], info["group_size"]
        )
        result[name] = recover_codes(weight, weight != 0, grid)
    return result
