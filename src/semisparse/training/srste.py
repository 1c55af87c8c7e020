"""AdamW with AST's annealed SR-STE decay of the pruned weights (`../shared/METHODS.md` §2.3).

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

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor, distribute_tensor

from semisparse.sparse.linear import as_multiplier

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
        """One update, parameter by parameter through torch's fused AdamW kernel: each parameter's few
        passes then stay in cache, which on CPU is ~4x faster than list-wide foreach kernels."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
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
                tensors = [param, param.grad, state["exp_avg"], state["exp_avg_sq"]]
                if mask is not None:
                    tensors.append(_mask_like(mask, param))
                _update(group, state["step"], *(_local(tensor) for tensor in tensors))
        return loss


def _local(tensor: Tensor) -> Tensor:
    """A DTensor's local shard: a parameter's tensors share its placement and the update is elementwise."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def _update(
    group: dict[str, Any],
    step: int,
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    mask: Tensor | None = None,
) -> None:
    """AdamW on one parameter; with a mask, the SR-STE variant.

    The SR-STE update is AdamW with β1 = 0 applied to `u` (its "gradient" and first moment are both `u`)
    at step size lr / (1 - β1ᵗ), so the fused kernel computes it after `m1` and `u` are formed here.
    """
    lr, (beta1, beta2), eps = group["lr"], group["betas"], group["eps"]
    steps = [torch.tensor(float(step), dtype=torch.float32, device=param.device)]
    if mask is None:
        torch._fused_adamw_(
            [param], [grad], [exp_avg], [exp_avg_sq], [], steps,
            lr=lr, beta1=beta1, beta2=beta2, weight_decay=group["weight_decay"], eps=eps,
            amsgrad=False, maximize=False,
        )  # fmt: skip
        return
    if group["weight_decay"]:
        param.mul_(1 - lr * group["weight_decay"])
    exp_avg.lerp_(grad, 1 - beta1)
    update = torch.addcmul(exp_avg, param, as_multiplier(~mask), value=group[DECAY_KEY])
    torch._fused_adamw_(
        [param], [update], [update], [exp_avg_sq], [], steps,
        lr=lr / (1 - beta1**step), beta1=0.0, beta2=beta2, weight_decay=0.0, eps=eps,
        amsgrad=False, maximize=False,
    )  # fmt: skip
