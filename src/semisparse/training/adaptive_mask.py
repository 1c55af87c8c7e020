"""AST's adaptive masks: every Δt steps the N:M mask is recomputed from the current weights.

The score is the weight magnitude (the paper's default) or the Wanda score `|W| · ‖X_j‖` with input norms
collected once on calibration data, since recollecting them would cost a calibration pass per update.
The flip rate (fraction of mask entries that changed) since the last update and since the initial mask
tells whether the decay is too strong (frozen mask) or too weak (oscillating mask).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from semisparse import nm
from semisparse.nm import NMPattern
from semisparse.pruning.magnitude import magnitude_mask
from semisparse.pruning.wanda import wanda_mask
from semisparse.sparse.linear import SparseLinear

MASK_SCORES: tuple[str, ...] = ("magnitude", "wanda")


@torch.no_grad()
def collect_input_norms(
    model: nn.Module, layers: Mapping[str, SparseLinear], calibration_ids: Tensor, batch_size: int = 8
) -> dict[str, Tensor]:
    """Squared L2 norm of every input feature of each layer over all calibration tokens (float32)."""
    norms = {
        name: torch.zeros(layer.in_features, dtype=torch.float32, device=layer.weight.device)
        for name, layer in layers.items()
    }

    def hook_for(name: str):
        def hook(module: nn.Module, args: tuple[Any, ...], output: Tensor) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            norms[name] += x.square().sum(dim=0).to(norms[name].device)

        return hook

    handles = [layer.register_forward_hook(hook_for(name)) for name, layer in layers.items()]
    device = next(model.parameters()).device
    try:
        for start in range(0, calibration_ids.shape[0], batch_size):
            model(input_ids=calibration_ids[start : start + batch_size].to(device))
    finally:
        for handle in handles:
            handle.remove()
    return norms


class MaskUpdater:
    """Recomputes the masks of the given layers in place and reports flip rates."""

    def __init__(
        self,
        layers: Mapping[str, SparseLinear],
        pattern: NMPattern,
        score: str = "magnitude",
        input_sq_norms: Mapping[str, Tensor] | None = None,
    ) -> None:
        if score not in MASK_SCORES:
            raise ValueError(f"unknown mask score {score!r}; use one of {MASK_SCORES}")
        if score == "wanda" and (input_sq_norms is None or set(input_sq_norms) != set(layers)):
            raise ValueError("the wanda score needs input norms for every layer (collect_input_norms)")
        self.layers = dict(layers)
        self.pattern = pattern
        self.score = score
        self.input_sq_norms = dict(input_sq_norms or {})
        self.initial = {name: layer.mask.clone() for name, layer in self.layers.items()}

    def new_mask(self, name: str) -> Tensor:
        """The mask of the current weight; a row-sharded (FSDP2) weight is gathered first, so every rank
        computes the same whole mask for its (unsharded) mask buffer."""
        weight = self.layers[name].weight
        if isinstance(weight, DTensor):
            weight = weight.full_tensor()
        if self.score == "wanda":
            return wanda_mask(weight, self.input_sq_norms[name], self.pattern, None)
        return magnitude_mask(weight, self.pattern, None)

    @torch.no_grad()
    def update(self) -> dict[str, float]:
        """Recompute every mask; returns `flip_rate` (vs the previous masks) and `flip_rate_initial`."""
        changed = changed_initial = None
        total = 0
        for name, layer in self.layers.items():
            mask = self.new_mask(name)
            flips = (mask != layer.mask).sum()
            flips_initial = (mask != self.initial[name]).sum()
            changed = flips if changed is None else changed + flips
            changed_initial = flips_initial if changed_initial is None else changed_initial + flips_initial
            total += mask.numel()
            layer.mask.copy_(mask)
        if not total:
            return {"flip_rate": 0.0, "flip_rate_initial": 0.0}
        return {"flip_rate": changed.item() / total, "flip_rate_initial": changed_initial.item() / total}

    def state_dict(self) -> dict[str, Any]:
        """The initial masks (bit-packed, as uint8 tensors so `torch.load(weights_only=True)` takes them)
        and the Wanda input norms: what a resumed run cannot recompute from the model."""
        return {
            "initial_masks": {
                name: torch.from_numpy(nm.pack_mask(mask)) for name, mask in self.initial.items()
            },
            "input_sq_norms": {name: norms.cpu() for name, norms in self.input_sq_norms.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        packed = state["initial_masks"]
        if set(packed) != set(self.layers):
            raise ValueError("saved initial masks do not match the sparse layers of this model")
        for name, layer in self.layers.items():
            bits = np.asarray(packed[name].cpu().numpy(), dtype=np.uint8)
            self.initial[name] = nm.unpack_mask(bits, tuple(layer.mask.shape)).to(layer.mask.device)
        self.input_sq_norms = {
            name: norms.to(self.layers[name].weight.device) for name, norms in state["input_sq_norms"].items()
        }
