"""Mask swaps: learn a better N:M mask for a unit whose kept weights were already reconstructed.

MaskLLM's candidates trained jointly with the weights lose to fixed masks at calibration budgets (the soft
forward trains the weights for a blend of masks that never ships). Swapping works on the shipped model
instead: with the unit's gradient G and a Gauss-Newton diagonal H of its local loss at every position
(pruned ones included), a second-order estimate of the loss change of moving one kept weight j of an N:M
group to a pruned position i, there to reach v = −G_i / H_i, is

    ΔL ≈ (−G_i² / (2 H_i)) + (−G_j w_j + ½ H_j w_j²),

a sum of a growth term and a removal term, so the best pair of a group is the best of each. The groups
with the most negative ΔL (at most `fraction` of a layer's groups) swap. The grown weight starts at zero
(the diagonal optimum v ignores correlated inputs and overshoots: on tiny models it raised the loss
several-fold); the caller trains the kept weights on the new mask and keeps it only if the unit's loss
ends lower.

H is the Gauss-Newton diagonal of the variance-normalised MSE, estimated per layer from its inputs and a
Rademacher probe of the unit's output (see `gradient_and_curvature`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from semisparse.nm import NMPattern


def gradient_and_curvature(
    modules: Sequence[tuple[nn.Module, bool]],
    batches: Sequence[tuple[Tensor, Tensor]],
    forward: Callable[[Tensor], Tensor],
    variance: float,
    generator: torch.Generator,
) -> tuple[list[Tensor], list[Tensor]]:
    """Mean gradient and Gauss-Newton diagonal of the normalised MSE over `batches` of (input, target)
    for the weight of each `(module, conv1d)` (float32, the weight's shape; nothing masked, so pruned
    positions get theirs too).

    The diagonal is Σ_t x_tj² δ_tr² per window: x the layer's input, δ the gradient at its output of a
    Rademacher probe ⟨output, z⟩, whose square is unbiased for the output's GN sensitivity; summing over
    tokens (dropping their cross terms) keeps it far less noisy than squaring the weight's probe gradient.
    """
    weights = [module.weight for module, _ in modules]
    grads = [torch.zeros_like(w, dtype=torch.float32) for w in weights]
    curvature = [torch.zeros_like(w, dtype=torch.float32) for w in weights]
    seen: dict[int, Tensor] = {}
    sensitivity: dict[int, Tensor] = {}

    def capture(index: int) -> Callable[..., None]:
        def hook(_module: nn.Module, args: tuple[Tensor, ...], output: Tensor) -> None:
            seen[index] = args[0].detach().float().reshape(-1, args[0].shape[-1]).square()
            if output.requires_grad:
                output.register_hook(lambda grad: sensitivity.__setitem__(index, grad.detach()))

        return hook

    handles = [module.register_forward_hook(capture(i)) for i, (module, _) in enumerate(modules)]
    for weight in weights:
        weight.requires_grad_(True)
    try:
        for inputs, targets in batches:
            sensitivity.clear()
            output = forward(inputs)
            scale = 1.0 / (targets.numel() * variance)
            loss = (output.float() - targets.float()).square().sum() * scale
            for total, value in zip(
                grads, torch.autograd.grad(loss, weights, retain_graph=True), strict=True
            ):
                total += value.float()
            sensitivity.clear()
            probe = torch.randint(0, 2, output.shape, generator=generator).to(output) * 2 - 1
            torch.autograd.grad((output * probe).sum(), weights)
            for i, (_, conv1d) in enumerate(modules):
                delta = sensitivity[i].float().reshape(-1, sensitivity[i].shape[-1]).square()
                fisher = delta.t() @ seen[i]  # [out, in]
                curvature[i] += (fisher.t() if conv1d else fisher) * (2 * scale)
    finally:
        for handle in handles:
            handle.remove()
        for weight in weights:
            weight.requires_grad_(False)
    count = max(len(batches), 1)
    return [g / count for g in grads], [h / count for h in curvature]


def plan_swaps(
    weight: Tensor,
    mask: Tensor,
    grad: Tensor,
    curvature: Tensor,
    pattern: NMPattern,
    fraction: float,
    grow_scale: float = 0.0,
) -> tuple[Tensor, Tensor]:
    """The new weight and mask after the best single swap in at most `fraction` of the N:M groups.

    All tensors are [out, in] with groups of `pattern.m` along `in`; only groups whose estimated loss
    change is negative swap. The inputs are not modified.
    """
    rows, cols = weight.shape
    m = pattern.m
    w = weight.float().reshape(rows, cols // m, m)
    kept = mask.reshape(rows, cols // m, m)
    g = grad.float().reshape_as(w)
    damping = 1e-6 * float(curvature.mean()) + 1e-30
    h = curvature.float().reshape_as(w) + damping
    grow = torch.where(kept, torch.inf, -g.square() / (2 * h))
    drop = torch.where(kept, 0.5 * h * w.square(), torch.inf)
    best_grow, grow_at = grow.min(dim=-1)
    best_drop, drop_at = drop.min(dim=-1)
    gain = (best_grow + best_drop).flatten()
    limit = int(fraction * gain.numel())
    flat_w, flat_m = w.reshape(-1, m).clone(), kept.reshape(-1, m).clone()
    values, order = torch.topk(-gain, min(limit, gain.numel()))
    chosen = order[values > 0]
    i, j = grow_at.flatten()[chosen], drop_at.flatten()[chosen]
    flat_w[chosen, j] = 0.0
    flat_m[chosen, j] = False
    flat_m[chosen, i] = True
    flat_w[chosen, i] = -grow_scale * g.reshape(-1, m)[chosen, i] / h.reshape(-1, m)[chosen, i]
    return flat_w.reshape(rows, cols).to(weight.dtype), flat_m.reshape(rows, cols)


def apply_swaps(
    modules: Sequence[tuple[nn.Module, bool]],
    masks: Sequence[Tensor],
    grads: Sequence[Tensor],
    curvature: Sequence[Tensor],
    pattern: NMPattern,
    fraction: float,
    grow_scale: float = 0.0,
) -> tuple[list[Tensor], int]:
    """Swap inside each module's weight in place; `(module, conv1d)` pairs hold [in, out] weights when
    conv1d. Returns the new masks (parameter layout) and how many mask entries changed."""
    new_masks, changed = [], 0
    for (module, conv1d), mask, grad, curv in zip(modules, masks, grads, curvature, strict=True):
        flip = (lambda t: t.t()) if conv1d else (lambda t: t)
        weight, new_mask = plan_swaps(
            flip(module.weight.detach()), flip(mask), flip(grad), flip(curv), pattern, fraction, grow_scale
        )
        with torch.no_grad():
            module.weight.copy_(flip(weight))
        new_mask = flip(new_mask).contiguous()
        changed += int((new_mask != mask).sum())
        new_masks.append(new_mask)
    return new_masks, changed
