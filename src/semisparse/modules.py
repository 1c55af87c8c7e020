"""Which layers of a model get pruned, and access to their weights.

A leaf of the package (it imports only torch, transformers' `Conv1D` and `semisparse.errors`), so every
other module can use it without import cycles. Targets are chosen torchao-style: `find_targets` offers
the Linear / Conv1D layers inside the decoder blocks to a `filter_fn(module, name) -> bool`;
`layer_filter` builds one from fnmatch globs.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from semisparse.errors import SemisparseError

FilterFn = Callable[[nn.Module, str], bool]

# Decoder-block containers of the supported families, tried before the generic search.
_BLOCK_PATHS = ("model.layers", "model.decoder.layers", "transformer.h")


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The list of transformer blocks, which calibration walks one at a time."""
    for dotted in _BLOCK_PATHS:
        found: object = model
        for part in dotted.split("."):
            found = getattr(found, part, None)
        if isinstance(found, nn.ModuleList):
            return found
    n_layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and n_layers is not None and len(module) == n_layers:
            return module
    raise SemisparseError(
        f"cannot find the decoder blocks of {type(model).__name__}; "
        "use a Llama-, Mistral-, Qwen2-, OPT- or GPT-2-style causal LM"
    )


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """The weight as [out, in], so N:M groups always run along the last dim (Conv1D stores [in, out])."""
    if isinstance(module, Conv1D):
        return module.weight.t()
    if isinstance(module, nn.Linear):
        return module.weight
    raise TypeError(f"{type(module).__name__} is not a Linear or Conv1D layer")


def set_weight_matrix(module: nn.Module, w: torch.Tensor) -> None:
    """Copy an [out, in] matrix into the layer in place, whatever its storage layout."""
    current = weight_matrix(module)
    if tuple(w.shape) != tuple(current.shape):
        raise ValueError(f"weight of shape {tuple(w.shape)} does not fit a layer of {tuple(current.shape)}")
    with torch.no_grad():
        current.copy_(w)


def set_submodule(model: nn.Module, dotted_name: str, new_module: nn.Module) -> None:
    """Put `new_module` in place of the submodule called `dotted_name` (e.g. `model.layers.0.mlp.up_proj`)."""
    parent, _, child = dotted_name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new_module)


@dataclass(frozen=True)
class GlobFilter:
    """A `filter_fn` from fnmatch globs on the full module name (`*` also matches dots).

    A layer is selected when it matches some `include` glob (any layer when there are none) and no
    `exclude` glob.
    """

    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()

    def __call__(self, module: nn.Module, name: str) -> bool:
        if self.include and not any(fnmatch.fnmatchcase(name, pattern) for pattern in self.include):
            return False
        return not any(fnmatch.fnmatchcase(name, pattern) for pattern in self.exclude)

    def __str__(self) -> str:
        return f"include={list(self.include)}, exclude={list(self.exclude)}"


def layer_filter(include: Sequence[str] = (), exclude: Sequence[str] = ()) -> GlobFilter:
    """A `filter_fn` selecting the layers whose names match an `include` glob and no `exclude` glob."""
    return GlobFilter(tuple(include), tuple(exclude))


def find_targets(
    model: nn.Module, filter_fn: FilterFn | None = None, m: int | None = None
) -> dict[str, nn.Module]:
    """The Linear/Conv1D layers inside the decoder blocks that get pruned, by full module name.

    Embeddings and the LM head live outside the blocks and so are never targets. `filter_fn(module, name)`
    picks among the block layers (all of them when None; see `layer_filter`). With `m`, every selected
    layer must have an input size divisible by m, checked up front so a run does not fail halfway.
    """
    blocks = decoder_blocks(model)
    prefix = next(name for name, module in model.named_modules() if module is blocks)
    targets: dict[str, nn.Module] = {}
    for name, module in blocks.named_modules(prefix=prefix):
        if not isinstance(module, nn.Linear | Conv1D):
            continue
        if filter_fn is not None and not filter_fn(module, name):
            continue
        targets[name] = module
    if not targets:
        raise SemisparseError(
            f"no layers to prune ({_describe(filter_fn)}); "
            f"names look like {prefix}.0.<submodule>, check the filter"
        )
    if m is not None:
        for name, module in targets.items():
            inputs = weight_matrix(module).shape[1]
            if inputs % m:
                raise SemisparseError(
                    f"layer {name} has {inputs} inputs, not a multiple of {m}: leave it out with `exclude`"
                )
    return targets


def _describe(filter_fn: FilterFn | None) -> str:
    if filter_fn is None:
        return "no filter"
    text = str(filter_fn)
    # A plain function's str is its repr with an address; its name reads better.
    if text.startswith("<"):
        text = getattr(filter_fn, "__qualname__", text)
    return f"filter {text}"


def context_length(model: nn.Module) -> int:
    """The longest sequence the model's position encoding supports, from its config."""
    config = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    raise SemisparseError(
        f"cannot tell the context length of {type(model).__name__}; pass `seqlen` explicitly"
    )
