"""The Gumbel-softmax masked weight `W ⊙ M̃` of a MaskLLM layer as one autograd function.

Written out with autograd, a sample costs a dozen passes over tensors 1.5x the weight's size (for 2:4),
each keeping its own saved copy, and a softmax over a last dimension of 6, which PyTorch runs slowly on
CPU. Here the forward works candidate-major (`[C, groups]`: a reduction over candidates is then a sum of C
contiguous rows), saves only the probabilities, and the backward applies the closed form of the softmax
Jacobian. The logits parameter is stored candidate-major too (a permuted view of `[C, out, in/M]`), so
neither direction needs a transposing copy.

For probabilities `y = softmax((κ·π + g) / τ)` of a group, its soft mask `M̃ = y S` (S: candidates) and
upstream gradient `G` on `W ⊙ M̃` (plus `2ρ · W ⊙ M̃` from a regulariser term `ρ · ‖W ⊙ M̃‖²`):

    ∂/∂M̃ = (G + 2ρ W ⊙ M̃) ⊙ W;   ∂/∂y = (∂/∂M̃) Sᵀ;   ∂/∂π = (κ/τ) · y ⊙ (∂/∂y − Σ_c y_c ∂/∂y_c)

`hard` forwards the one-hot sample with that same (soft) gradient. A trainable weight (joint mode) gets
the dense straight-through gradient `G`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

_TINY = torch.finfo(torch.float32).tiny


def gumbel_noise(like: Tensor) -> Tensor:
    """Standard Gumbel samples `-log(-log U)` shaped like `like` (fp32, contiguous), from the global RNG.

    Drawn from uniforms (an exponential draw costs ~6x more on CPU); U is kept above the smallest normal
    float, so a rare U = 0 gives a finite sample.
    """
    noise = torch.empty(like.shape, dtype=torch.float32, device=like.device).uniform_()
    return noise.clamp_(min=_TINY).log_().neg_().log_().neg_()


def candidate_major_init(out_features: int, groups: int, candidates: int, **tensor_options: Any) -> Tensor:
    """Empty `[out, groups, C]` logits stored candidate-major (strides `(groups, 1, out·groups)`)."""
    return torch.empty(candidates, out_features, groups, **tensor_options).permute(1, 2, 0)


def candidate_major(logits: Tensor) -> Tensor:
    """`[out, groups, C]` -> `[C, out·groups]`: a view for candidate-major storage, else a copy."""
    return logits.permute(2, 0, 1).reshape(logits.shape[-1], -1)


def from_candidate_major(values: Tensor, shape: torch.Size) -> Tensor:
    """`[C, out·groups]` -> `[out, groups, C]` as a view (the layout of candidate-major logits)."""
    return values.view(shape[2], shape[0], shape[1]).permute(1, 2, 0)


def sample_probabilities(logits: Tensor, tau: float, kappa: float) -> Tensor:
    """One Gumbel-softmax sample `softmax((κ·π + g) / τ)` per group, candidate-major `[C, groups]` fp32."""
    scores = candidate_major(logits.detach().float())
    scores = gumbel_noise(scores).add_(scores, alpha=kappa).div_(tau)
    probs = scores.sub_(scores.amax(0)).exp_()
    return probs.div_(probs.sum(0))


class _GumbelMaskedWeight(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, weight: Tensor, logits: Tensor, candidates: Tensor, tau: float, kappa: float, hard: bool
    ) -> tuple[Tensor, Tensor, Tensor]:
        with torch.autocast(weight.device.type, enabled=False):
            probs = sample_probabilities(logits, tau, kappa)
            mask = candidates[probs.max(0).indices] if hard else (candidates.t() @ probs).t()
            groups = weight.reshape(mask.shape)
            masked = (groups * mask.to(weight.dtype)).reshape(weight.shape)
            flat = masked.reshape(-1).float()
            regulariser = flat.dot(flat)
            max_probability = probs.amax(0).mean()
        ctx.save_for_backward(weight, probs, masked, candidates)
        ctx.scale = kappa / tau
        ctx.logits_shape = logits.shape
        ctx.mark_non_differentiable(max_probability)
        return masked, regulariser, max_probability

    @staticmethod
    def backward(
        ctx: Any, grad_masked: Tensor, grad_regulariser: Tensor, _: Tensor
    ) -> tuple[Tensor | None, Tensor | None, None, None, None, None]:
        weight, probs, masked, candidates = ctx.saved_tensors
        grad_weight = grad_masked if ctx.needs_input_grad[0] else None
        if not ctx.needs_input_grad[1]:
            return grad_weight, None, None, None, None, None
        with torch.autocast(weight.device.type, enabled=False):
            grad = grad_masked.float() + (2 * grad_regulariser) * masked.float()
            grad_mask = grad.mul_(weight.float()).view(probs.shape[1], candidates.shape[1])
            grad_probs = candidates @ grad_mask.t()
            centred = grad_probs.sub_((grad_probs * probs).sum(0))
            grad_scores = centred.mul_(probs).mul_(ctx.scale)
        return grad_weight, from_candidate_major(grad_scores, ctx.logits_shape), None, None, None, None


def sample_masked_weight(
    weight: Tensor, logits: Tensor, candidates: Tensor, tau: float, kappa: float, hard: bool = False
) -> tuple[Tensor, Tensor, Tensor]:
    """A fresh sample of `W ⊙ M̃` ([out, in], W's dtype), `‖W ⊙ M̃‖²` (fp32) and the mean max-probability.

    The first two carry gradients to the logits (and to W if it trains); the mask is computed in fp32
    whatever the autocast state, so each group sums to N and tiny gradients at low τ survive.
    """
    return _GumbelMaskedWeight.apply(weight, logits, candidates, tau, kappa, hard)
