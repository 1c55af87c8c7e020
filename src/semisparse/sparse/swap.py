"""Swapping a model's target linears for `SparseLinear` and back, and storing a kept SLoRB branch.

Swaps keep module names, so state-dict keys stay `<module>.weight` / `.bias` and gain `.mask` and
`.slorb.*`. `densify` returns plain Linear / Conv1D layers holding `W ⊙ mask`, so `save_pretrained` writes
a model that plain transformers loads; a kept SLoRB goes to a side file that transformers ignores and
`attach_saved_slorb` re-attaches.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from semisparse import nm
from semisparse.errors import SemisparseError
from semisparse.modules import find_targets, layer_filter, set_submodule, weight_matrix
from semisparse.nm import NMPattern
from semisparse.pruning.magnitude import magnitude_mask
from semisparse.sparse.linear import SparseLinear
from semisparse.sparse.slorb import SLoRB, SLoRBConfig, check_group_size, initial_scales

SLORB_FILE = "slorb.safetensors"
_TWO_FOUR = NMPattern(2, 4)
_SLORB_FORMAT = {"format": "semisparse-slorb", "version": "1"}


def _checked_mask(name: str, mask: Tensor, shape: torch.Size, pattern: NMPattern) -> Tensor:
    """A mask must fit its layer and keep exactly N of every M, or training would silently change sparsity."""
    if tuple(mask.shape) != tuple(shape):
        raise SemisparseError(
            f"mask for {name} has shape {tuple(mask.shape)} but the layer is {tuple(shape)}: "
            "use masks computed for this model"
        )
    mask = mask.to(torch.bool)
    if not nm.is_nm(mask, pattern.n, pattern.m, exact=True):
        raise SemisparseError(
            f"mask for {name} does not keep exactly {pattern}: recompute it with that pattern"
        )
    return mask


def sparsify(
    model: nn.Module,
    masks: Mapping[str, Tensor] | None = None,
    pattern: NMPattern = _TWO_FOUR,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    slorb: SLoRBConfig | None = None,
    slorb_weights: Mapping[str, Tensor] | None = None,
) -> dict[str, SparseLinear]:
    """Swap every target layer for a `SparseLinear` in place; returns {module name: layer}.

    `masks` (by module name) default to magnitude masks of the current weights. With `slorb`, each layer
    gets a SLoRB branch whose `S` starts from the pruned entries of `slorb_weights[name]` ([out, in]; by
    default the layer's own weight), which lets a caller pass the dense weights when pruning (SparseGPT)
    has already zeroed them.
    """
    targets = find_targets(model, layer_filter(include, exclude), m=pattern.m)
    if masks is not None and set(masks) != set(targets):
        missing = sorted(set(targets) - set(masks)) or sorted(set(masks) - set(targets))
        raise SemisparseError(
            f"masks do not match the target layers (first mismatch: {missing[0]}): "
            "use masks saved for this model and the same `include`/`exclude`"
        )
    if slorb is not None:
        for name, module in targets.items():
            check_group_size(weight_matrix(module).shape[1], slorb.k, name)
    layers: dict[str, SparseLinear] = {}
    for name, module in targets.items():
        weight = weight_matrix(module)
        if masks is None:
            mask = magnitude_mask(weight, pattern, None)
        else:
            mask = _checked_mask(name, masks[name], weight.shape, pattern)
        layer = SparseLinear.from_module(module, mask)
        if slorb is not None:
            source = layer.weight if slorb_weights is None else slorb_weights[name]
            branch = SLoRB(
                layer.in_features,
                layer.out_features,
                slorb.k,
                slorb.train_projection,
                dtype=layer.weight.dtype,
                device=layer.weight.device,
                name=name,
            )
            with torch.no_grad():
                branch.S.copy_(
                    initial_scales(source.to(layer.weight.device), layer.mask, slorb.k, slorb.init)
                )
            layer.slorb = branch
        set_submodule(model, name, layer)
        layers[name] = layer
    return layers


def sparse_layers(model: nn.Module) -> dict[str, SparseLinear]:
    """Every `SparseLinear` of the model by module name."""
    return {name: module for name, module in model.named_modules() if isinstance(module, SparseLinear)}


def densify(model: nn.Module, keep_slorb: bool = False) -> dict[str, Tensor]:
    """Swap each `SparseLinear` back to its original class holding `W ⊙ mask`, in place.

    Returns the SLoRB tensors (`<module>.S`, and `<module>.X` when the projection was trained) when
    `keep_slorb`, for `save_slorb`; otherwise the branches are dropped and {} is returned.
    """
    tensors: dict[str, Tensor] = {}
    for name, layer in sparse_layers(model).items():
        if keep_slorb and layer.slorb is not None:
            tensors[f"{name}.S"] = layer.slorb.S.detach().clone()
            if layer.slorb.X is not None:
                tensors[f"{name}.X"] = layer.slorb.X.detach().clone()
        set_submodule(model, name, layer.to_dense_module())
    return tensors


def save_slorb(tensors: Mapping[str, Tensor], directory: str | Path) -> Path:
    """Write kept SLoRB branches next to a saved model (`slorb.safetensors`)."""
    path = Path(directory) / SLORB_FILE
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path), _SLORB_FORMAT)
    return path


def _add_slorb_output(module: nn.Module, args: tuple[Any, ...], output: Tensor) -> Tensor:
    return output + module.slorb(args[0])


def attach_saved_slorb(model: nn.Module, model_dir: str | Path) -> bool:
    """Re-attach the SLoRB branches saved beside a model to its plain layers; False if there are none.

    Each branch becomes a `slorb` submodule of its layer plus a forward hook adding its output, so the
    layer keeps its class and layout.
    """
    path = Path(model_dir).expanduser() / SLORB_FILE
    if not path.is_file():
        return False
    try:
        tensors = load_file(str(path))
    except Exception as err:  # safetensors raises its own SafetensorError for truncated/garbled files
        detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise SemisparseError(
            f"{path} is damaged ({detail}); re-export the model or delete the file to load it without SLoRB"
        ) from err
    names = sorted({key.rsplit(".", 1)[0] for key in tensors})
    for name in names:
        if f"{name}.S" not in tensors:
            raise SemisparseError(f"{path} has a projection but no S for {name}: re-export the model")
        try:
            module = model.get_submodule(name)
            weight = weight_matrix(module)
        except (AttributeError, TypeError) as err:
            raise SemisparseError(
                f"{path} names layer {name}, which is not a linear layer of this model: "
                "load the model the file was saved with"
            ) from err
        scales = tensors[f"{name}.S"]
        out_features, in_features = weight.shape
        if scales.dim() != 2 or scales.shape[0] != out_features or in_features % scales.shape[1]:
            raise SemisparseError(
                f"{path}: S of {name} has shape {tuple(scales.shape)}, which does not fit a "
                f"[{out_features}, {in_features}] layer: load the model the file was saved with"
            )
        projection = tensors.get(f"{name}.X")
        branch = SLoRB(
            in_features,
            out_features,
            in_features // scales.shape[1],
            train_projection=projection is not None,
            dtype=weight.dtype,
            device=weight.device,
            name=name,
        )
        branch.load_state_dict({"S": scales} | ({"X": projection} if projection is not None else {}))
        had_branch = isinstance(getattr(module, "slorb", None), SLoRB)
        module.slorb = branch
        if not had_branch:
            module.register_forward_hook(_add_slorb_output)
    return True


def slorb_overhead(model: nn.Module) -> dict[str, float]:
    """Parameters the SLoRB branches add, and their ratio to the kept (unmasked) weights of those layers."""
    boosted = [layer for layer in sparse_layers(model).values() if layer.slorb is not None]
    s_params = sum(layer.slorb.S.numel() for layer in boosted)
    x_params = sum(layer.slorb.X.numel() for layer in boosted if layer.slorb.X is not None)
    kept = sum(int(layer.mask.sum()) for layer in boosted)
    extra = s_params + x_params
    return {
        "layers": len(boosted),
        "s_params": s_params,
        "x_params": x_params,
        "extra_params": extra,
        "kept_weights": kept,
        "ratio_to_kept": extra / kept if kept else 0.0,
    }
