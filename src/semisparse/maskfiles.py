"""Mask files in the public MaskLLM format, and applying them to a dense model with strict checks.

A file is a `numpy.savez_compressed` archive with one entry per pruned weight, keyed `<param name>.mask`
(e.g. `model.layers.0.mlp.up_proj.weight.mask`), holding `numpy.packbits` of the flattened bool mask
(True = kept). Packing drops the shape, so readers take it from the model: every mask has exactly the
shape of its weight *parameter* (GPT-2's Conv1D stores [in, out]), which lets plain numpy users apply it
with `weight * mask`. N:M groups are checked in the [out, in] layout, along the input dimension.

A mask of an N:M pattern keeps exactly N of every M weights (a weight that is zero anyway may be among
the kept); one that keeps fewer somewhere (down to a whole layer of zeros) is refused unless the caller
allows at-most-N masks (`at_most`, `semisparse apply-mask --at-most`).
"""

from __future__ import annotations

import math
import os
import tempfile
import zipfile
import zlib
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from semisparse import nm
from semisparse.errors import SemisparseError
from semisparse.export import usual_mode
from semisparse.modules import find_targets, layer_filter, weight_matrix
from semisparse.nm import NMPattern

MASK_SUFFIX = ".mask"
# File name of the masks inside a model directory written by semisparse.
MASKS_FILE = "masks.npz"


def to_parameter_layout(module: nn.Module, matrix_mask: Tensor) -> Tensor:
    """An [out, in] mask in the layout of the module's weight parameter (Conv1D stores [in, out])."""
    return matrix_mask.t().contiguous() if isinstance(module, Conv1D) else matrix_mask


def to_matrix_layout(module: nn.Module, param_mask: Tensor) -> Tensor:
    """Inverse of `to_parameter_layout`: a mask shaped like the weight parameter, seen as [out, in]."""
    return param_mask.t() if isinstance(module, Conv1D) else param_mask


def target_shapes(
    model: nn.Module,
    pattern: NMPattern | None = None,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
) -> dict[str, tuple[int, ...]]:
    """Weight parameter name -> parameter shape of every target layer: what a mask file must cover."""
    targets = find_targets(model, layer_filter(include, exclude), m=pattern.m if pattern else None)
    return {f"{name}.weight": tuple(module.weight.shape) for name, module in targets.items()}


def save_masks(masks: dict[str, Tensor], path: str | Path) -> Path:
    """Write bool masks (keyed by weight parameter name) bit-packed, atomically replacing `path`."""
    path = Path(path).expanduser()
    arrays = {f"{name}{MASK_SUFFIX}": nm.pack_mask(mask) for name, mask in masks.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as out:
            np.savez_compressed(out, **arrays)
        os.chmod(tmp, usual_mode(directory=False))  # mkstemp makes it private
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _check_names(found: Iterable[str], expected: Iterable[str], source: str) -> None:
    """Every target covered, nothing else: a partial or foreign mask would silently prune the wrong thing."""
    found, expected = set(found), set(expected)
    unknown = sorted(found - expected)
    if unknown:
        raise SemisparseError(
            f"{source} has a mask for '{unknown[0]}' ({len(unknown)} unknown in all), which is not a target "
            "layer of this model: use masks made for this architecture (and the same `include`/`exclude`)"
        )
    missing = sorted(expected - found)
    if missing:
        raise SemisparseError(
            f"{source} has no mask for '{missing[0]}' ({len(missing)} of {len(expected)} target layers "
            "missing): export masks for every target layer of this model"
        )


def load_masks(path: str | Path, shapes: dict[str, tuple[int, ...]]) -> dict[str, Tensor]:
    """Read a mask file, checking names and packed sizes against `shapes` (param name -> param shape)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise SemisparseError(f"mask file {path} does not exist: check the path")
    masks: dict[str, Tensor] = {}
    try:
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise SemisparseError(
                f"mask file {path} holds a single array, not an .npz archive of '<param name>{MASK_SUFFIX}' "
                "entries: re-export it with semisparse export-mask"
            )
        with loaded as archive:
            keys = list(archive.files)
            bad = [key for key in keys if not key.endswith(MASK_SUFFIX)]
            if bad:
                raise SemisparseError(
                    f"mask file {path} has an entry '{bad[0]}' not named '<param name>{MASK_SUFFIX}': "
                    "it is not a MaskLLM mask file, re-export it"
                )
            names = {key[: -len(MASK_SUFFIX)]: key for key in keys}
            _check_names(names, shapes, f"mask file {path}")
            for name, key in names.items():
                masks[name] = _unpack(archive[key], shapes[name], name, path)
    except (zipfile.BadZipFile, zlib.error, ValueError, OSError, EOFError, KeyError) as err:
        detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise SemisparseError(
            f"cannot read mask file {path} ({detail}): it is corrupt or not a .npz, re-export it"
        ) from err
    return masks


def _unpack(packed: np.ndarray, shape: tuple[int, ...], name: str, path: Path) -> Tensor:
    expected = (math.prod(shape) + 7) // 8
    if packed.dtype != np.uint8 or packed.ndim != 1:
        raise SemisparseError(
            f"mask '{name}' in {path} is {packed.dtype} of shape {packed.shape}, not packed bits "
            "(1-D uint8 from numpy.packbits): re-export the mask file"
        )
    if packed.shape[0] != expected:
        raise SemisparseError(
            f"mask '{name}' in {path} has {packed.shape[0]} packed bytes, but the weight of shape "
            f"{tuple(shape)} needs {expected}: the file was made for another model"
        )
    return nm.unpack_mask(packed, shape)


def check_masks(
    model: nn.Module,
    masks: dict[str, Tensor],
    pattern: NMPattern,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    source: str = "the masks",
    at_most: bool = False,
) -> dict[str, nn.Module]:
    """Validate names, shapes and the N:M pattern of `masks`; returns the targets by weight param name.

    Every group of M must keep exactly N (`at_most`: N or fewer, so a group or a layer may be all zeros).
    """
    targets = {
        f"{name}.weight": module
        for name, module in find_targets(model, layer_filter(include, exclude), m=pattern.m).items()
    }
    _check_names(masks, targets, source)
    for name, mask in masks.items():
        module = targets[name]
        if mask.dtype != torch.bool or tuple(mask.shape) != tuple(module.weight.shape):
            raise SemisparseError(
                f"mask for '{name}' in {source} is {mask.dtype} {tuple(mask.shape)}, but the weight needs "
                f"bool {tuple(module.weight.shape)}: the masks were made for another model"
            )
        matrix_mask = to_matrix_layout(module, mask)
        if not nm.is_nm(matrix_mask, pattern.n, pattern.m, exact=not at_most):
            kept = matrix_mask.reshape(-1, pattern.m).sum(-1)
            if int(kept.max()) > pattern.n:
                raise SemisparseError(
                    f"mask for '{name}' in {source} keeps up to {int(kept.max())} of every {pattern.m} "
                    f"weights, so it is not {pattern}: pass the mask's own `pattern`"
                )
            raise SemisparseError(
                f"mask for '{name}' in {source} keeps only {int(kept.min())} of {pattern.m} weights in "
                f"{int((kept < pattern.n).sum())} group(s), not exactly {pattern.n}: pass `at_most` if "
                f"fewer than {pattern.n} is meant"
            )
    return targets


def apply_masks(
    model: nn.Module,
    masks: dict[str, Tensor],
    pattern: NMPattern,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    source: str = "the masks",
    at_most: bool = False,
) -> dict[str, float]:
    """Zero the weights the masks drop, in place, after checking every mask; returns each layer's sparsity.

    Nothing is modified unless all masks pass (exactly N of every M kept; `at_most`: N or fewer), so a bad
    file never leaves a half-masked model.
    """
    targets = check_masks(model, masks, pattern, include, exclude, source, at_most)
    with torch.no_grad():
        for name, module in targets.items():
            module.weight.mul_(masks[name].to(device=module.weight.device, dtype=module.weight.dtype))
    return {name[: -len(".weight")]: nm.sparsity(weight_matrix(m)) for name, m in targets.items()}


def masks_from_model(
    model: nn.Module, pattern: NMPattern, include: Sequence[str] = (), exclude: Sequence[str] = ()
) -> dict[str, Tensor]:
    """The masks of an already N:M-sparse model, read from its zeros (param layout, keyed by param name).

    Each keeps exactly N of every M: a group with fewer non-zeros (a kept weight that is zero) also keeps
    its first zeros, as the compressed format does, so the masks pass the exact check of `apply_masks`.
    """
    masks = {}
    for name, module in find_targets(model, layer_filter(include, exclude), m=pattern.m).items():
        matrix = weight_matrix(module).detach()
        if not nm.is_nm(matrix, pattern.n, pattern.m):
            raise SemisparseError(
                f"layer {name} is not {pattern} sparse (some group keeps more than {pattern.n} of "
                f"{pattern.m} weights): prune the model first, or pass its own `pattern`"
            )
        matrix_mask = nm.nm_mask((matrix != 0).float(), pattern.n, pattern.m)
        masks[f"{name}.weight"] = to_parameter_layout(module, matrix_mask).cpu()
    return masks
