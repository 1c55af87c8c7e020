"""A linear layer whose N:M mask is learned: one categorical distribution over candidates per group.

The dense weight stays frozen (kept in the `nn.Linear` [out, in] layout even for GPT-2's Conv1D, so groups
always run along the last dim); only the fp32 logits `[out, in/M, C(M, N)]` train. Training forwards draw
a Gumbel-softmax sample `y = softmax((κ·π + g) / τ)` and use the soft mask `M̃ = y @ S` (values in [0, 1],
each group summing to N); `hard` forwards the one-hot sample with the soft gradient. Evaluation forwards
use the argmax candidate, i.e. the mask that will ship.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from semisparse.maskllm.candidates import candidate_count, candidate_masks
from semisparse.nm import NMPattern

LOGIT_INIT_STD = 0.01

SourceKind = Literal["linear", "conv1d"]


def gumbel_noise(like: Tensor) -> Tensor:
    """Standard Gumbel samples shaped like `like` (-log E, E ~ Exp(1)), from the global RNG.

    One buffer, updated in place: the noise is as large as the logits (1.5 values per weight for 2:4).
    E is kept above the smallest normal float so a rare E = 0 cannot turn into an infinite logit.
    """
    noise = torch.empty_like(like, dtype=torch.float32).exponential_()
    return noise.clamp_(min=torch.finfo(torch.float32).tiny).log_().neg_()


class LearnableMaskLinear(nn.Module):
    """`y = x (W ⊙ M)ᵀ + b` with a learned N:M mask M; W frozen unless joint training turns it on.

    `tau`, `kappa` and `hard` are plain attributes the trainer sets each step (`swap.set_schedule`).
    After each training forward, `last_regulariser` holds ‖W ⊙ M̃‖²_F of that very sample (W detached,
    graph to the logits) and `last_max_probability` the mean max-probability of the sampled candidates:
    computing them inside the forward keeps them correct under gradient checkpointing and sharding.
    """

    def __init__(
        self,
        weight: Tensor,
        bias: Tensor | None,
        pattern: NMPattern,
        source: SourceKind = "linear",
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        out_features, in_features = weight.shape
        if in_features % pattern.m:
            raise ValueError(f"input size {in_features} is not a multiple of M={pattern.m}")
        self.pattern = pattern
        self.source: SourceKind = source
        self.weight = nn.Parameter(weight.detach(), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        count = candidate_count(pattern)
        shape = (out_features, in_features // pattern.m, count)
        # Drawn on the weight's device (a 7B model has ~10^10 logits): `generator` must live there too.
        init = torch.randn(shape, generator=generator, device=weight.device, dtype=torch.float32)
        self.logits = nn.Parameter(init.mul_(LOGIT_INIT_STD))
        self.register_buffer("candidates", candidate_masks(pattern).to(weight.device), persistent=False)
        self.tau = 4.0
        self.kappa = 1e2
        self.hard = False
        self.last_regulariser: Tensor | None = None
        self.last_max_probability: Tensor | None = None

    @classmethod
    def from_module(
        cls, module: nn.Module, pattern: NMPattern, generator: torch.Generator | None = None
    ) -> LearnableMaskLinear:
        """Wrap an `nn.Linear` or GPT-2 `Conv1D` (whose [in, out] weight is transposed once, here)."""
        if isinstance(module, Conv1D):
            return cls(module.weight.detach().t().contiguous(), module.bias, pattern, "conv1d", generator)
        if isinstance(module, nn.Linear):
            return cls(module.weight, module.bias, pattern, "linear", generator)
        raise TypeError(f"{type(module).__name__} is not a Linear or Conv1D layer")

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def sample_mask(self) -> tuple[Tensor, Tensor]:
        """A fresh Gumbel-softmax mask [out, in] (fp32, graph to the logits) and its sample probabilities.

        Runs outside autocast: the mask must stay fp32 so each group sums to N and the tiny logit
        gradients at low temperature are not rounded away.
        """
        with torch.autocast(self.logits.device.type, enabled=False):
            scores = gumbel_noise(self.logits).add_(self.logits, alpha=self.kappa).div_(self.tau)
            probs = torch.softmax(scores, dim=-1)
            weights = probs
            if self.hard:
                one_hot = torch.zeros_like(probs).scatter_(-1, probs.argmax(-1, keepdim=True), 1.0)
                weights = one_hot + (probs - probs.detach())  # exactly one-hot forward
            mask = weights @ self.candidates
        return mask.reshape(self.out_features, self.in_features), probs

    def candidate_index(self) -> Tensor:
        """The argmax candidate of every group, [out, in/M] (int64).

        Outside a forward, FSDP2 holds the logits as a row-sharded DTensor: gather them (a collective,
        so every rank calls this at the same point, as `after_step` and export do).
        """
        logits = self.logits.detach()
        if hasattr(logits, "full_tensor"):
            logits = logits.full_tensor()
        return logits.argmax(-1)

    def argmax_mask(self) -> Tensor:
        """The deterministic mask that ships: the argmax candidate per group, bool [out, in]."""
        chosen = self.candidates[self.candidate_index()] > 0.5
        return chosen.reshape(self.out_features, self.in_features)

    def masked_weight(self) -> Tensor:
        """W ⊙ argmax mask, detached: what export writes."""
        return self.weight.detach() * self.argmax_mask().to(self.weight.dtype)

    def forward(self, x: Tensor) -> Tensor:
        if not self.training:
            weight = self.weight * self.argmax_mask().to(self.weight.dtype)
            return F.linear(x, weight, self.bias)
        mask, probs = self.sample_mask()
        frozen = self.weight.detach()
        masked = frozen * mask.to(self.weight.dtype)
        self.last_max_probability = probs.detach().amax(-1).mean()
        self.last_regulariser = masked.float().square().sum()
        if self.weight.requires_grad:
            # Joint mode: the weight gets the dense (straight-through) gradient, the mask still gets g ⊙ W.
            return F.linear(x, masked + (self.weight - frozen), self.bias)
        return F.linear(x, masked, self.bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, pattern={self.pattern}, "
            f"candidates={self.logits.shape[-1]}, source={self.source}"
        )
