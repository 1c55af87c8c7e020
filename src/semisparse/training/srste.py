"""AdamW with AST's annealed SR-STE decay of the currently pruned weights (METHODS.md §2.3).

For a parameter with a mask, the decay `d = λ_t · (~mask) ⊙ W` bypasses the first moment but enters the
second, so it is normalised like the gradient instead of being a tiny additive pull:

    m1 = β1 m1 + (1-β1) g;  u = m1 + d;  v = β2 v + (1-β2) u²;  W -= lr/(1-β1ᵗ) · u / (sqrt(v/(1-β2ᵗ)) + ε)

(taken literally: for a masked parameter the second moment tracks `u²`, not `g²`, even when `λ_t = 0`).

Decoupled weight decay `W *= 1 - lr·wd` comes first, as in AdamW. Parameters without a mask follow
`torch.optim.AdamW` exactly. Masks must be bool (True = kept): the reference code negated an int mask
with `~`, which flips the decay's sign. They are read at every step because mask updates change them in
place. `λ_t` lives in each param group (`srste_decay`), so it travels with `state_dict`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor, distribute_tensor

DECAY_KEY = "srste_decay"


def annealed_decay(step: int, lam: float, warmup_steps: int) -> float:
    """`λ_t`: linear from 0 at step 0 to `lam` at `warmup_steps`, then constant (no ramp if warmup is 0)."""
    if lam < 0 or warmup_steps < 0 or step < 0:
        raise ValueError(f"need step, lam, warmup_steps >= 0, got {step}, {lam}, {warmup_steps}")
    if warmup_steps == 0 or step >= warmup_steps:
        return float(lam)
    return lam * step / warmup_steps


def _mask_like(mask: Tensor, param: Tensor) -> Tensor:
    """The mask in the parameter's layout: under FSDP2 a weight is a row-sharded DTensor while its mask
    buffer stays whole on every rank, so each rank slices its own rows (locally, no communication)."""
    if isinstance(param, DTensor) and not isinstance(mask, DTensor):
        return distribute_tensor(mask, param.device_mesh, param.placements, src_data_rank=None)
    return mask


class SRSTEAdamW(torch.optim.Optimizer):
    """AdamW whose masked parameters also get the SR-STE decay of their pruned entries."""

    def __init__(
        self,
        params: Iterable[Any],
        masks: Mapping[nn.Parameter, Tensor],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        decay: float = 0.0,
    ) -> None:
        if lr < 0 or eps < 0 or weight_decay < 0 or decay < 0:
            raise ValueError(
                f"lr, eps, weight_decay and decay must be >= 0, got {lr}, {eps}, {weight_decay}, {decay}"
            )
        if not all(0.0 <= beta < 1.0 for beta in betas):
            raise ValueError(f"betas must lie in [0, 1), got {betas}")
        for mask in masks.values():
            if mask.dtype != torch.bool:
                raise TypeError(f"SR-STE masks must be bool (True = kept), got {mask.dtype}")
        defaults = {
            "lr": lr,
            "betas": tuple(betas),
            "eps": eps,
            "weight_decay": weight_decay,
            DECAY_KEY: decay,
        }
        super().__init__(params, defaults)
        self.masks = masks

    def set_decay(self, value: float) -> None:
        """Set `λ_t` for every group (the caller anneals it each step)."""
        if value < 0:
            raise ValueError(f"SR-STE decay must be >= 0, got {value}")
        for group in self.param_groups:
            group[DECAY_KEY] = float(value)

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        """One update; parameters sharing a step count and kind are updated together with foreach
        kernels (a per-tensor loop would launch a dozen kernels per parameter)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            buckets: dict[tuple[int, bool], _Bucket] = {}
            for param in group["params"]:
                if param.grad is None:
                    continue
                if param.grad.is_sparse:
                    raise RuntimeError("SRSTEAdamW does not support sparse gradients")
                state = self.state[param]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                state["step"] += 1
                mask = self.masks.get(param)
                bucket = buckets.setdefault((state["step"], mask is not None), _Bucket())
                bucket.params.append(param)
                bucket.grads.append(param.grad)
                bucket.exp_avgs.append(state["exp_avg"])
                bucket.exp_avg_sqs.append(state["exp_avg_sq"])
                if mask is not None:
                    bucket.masks.append(_mask_like(mask, param))
            for (step, _), bucket in buckets.items():
                _update(group, step, bucket)
        return loss


@dataclass
class _Bucket:
    params: list[Tensor] = field(default_factory=list)
    grads: list[Tensor] = field(default_factory=list)
    exp_avgs: list[Tensor] = field(default_factory=list)
    exp_avg_sqs: list[Tensor] = field(default_factory=list)
    masks: list[Tensor] = field(default_factory=list)


def _update(group: dict[str, Any], step: int, b: _Bucket) -> None:
    """AdamW for a bucket of parameters at the same step; with masks, the SR-STE variant."""
    lr, (beta1, beta2), eps = group["lr"], group["betas"], group["eps"]
    torch._foreach_mul_(b.params, 1 - lr * group["weight_decay"])
    torch._foreach_lerp_(b.exp_avgs, b.grads, 1 - beta1)
    if b.masks:
        updates = [param.masked_fill(mask, 0) for param, mask in zip(b.params, b.masks, strict=True)]
        torch._foreach_mul_(updates, group[DECAY_KEY])
        torch._foreach_add_(updates, b.exp_avgs)
        second = updates
    else:
        updates, second = b.exp_avgs, b.grads
    torch._foreach_mul_(b.exp_avg_sqs, beta2)
    torch._foreach_addcmul_(b.exp_avg_sqs, second, second, value=1 - beta2)
    denom = torch._foreach_sqrt(b.exp_avg_sqs)
    torch._foreach_div_(denom, math.sqrt(1 - beta2**step))
    torch._foreach_add_(denom, eps)
    torch._foreach_addcdiv_(b.params, updates, denom, value=-lr / (1 - beta1**step))
