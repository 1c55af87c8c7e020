"""A linear layer whose N:M mask is learned: one categorical distribution over candidates per group.

The dense weight stays frozen (kept in the `nn.Linear` [out, in] layout even for GPT-2's Conv1D, so groups
always run along the last dim); only the fp32 logits `[out, in/M, C(M, N)]` train (stored candidate-major,
see `gumbel`). Training forwards draw a Gumbel-softmax sample `y = softmax((κ·π + g) / τ)` and use the soft
mask `M̃ = y @ S` (values in [0, 1], each group summing to N); `hard` forwards the one-hot sample with the
soft gradient. Evaluation forwards use the argmax candidate, i.e. the mask that will ship.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from semisparse.maskllm.candidates import candidate_count, candidate_masks
from semisparse.maskllm.gumbel import candidate_major, candidate_major_init, sample_masked_weight
from semisparse.nm import NMPattern

LOGIT_INIT_STD = 0.01

SourceKind = Literal["linear", "conv1d"]


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
        init = candidate_major_init(*shape, device=weight.device, dtype=torch.float32)
        self.logits = nn.Parameter(init.normal_(0.0, LOGIT_INIT_STD, generator=generator))
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

    def sample_mask(self) -> Tensor:
        """A fresh Gumbel-softmax mask [out, in] (fp32, graph to the logits), drawn as a training forward."""
        ones = torch.ones_like(self.weight, dtype=torch.float32)
        return sample_masked_weight(ones, self.logits, self.candidates, self.tau, self.kappa, self.hard)[0]

    def candidate_index(self) -> Tensor:
        """The argmax candidate of every group, [out, in/M] (int64).

        Outside a forward, FSDP2 holds the logits as a row-sharded DTensor: gather them (a collective,
        so every rank calls this at the same point, as `after_step` and export do).
        """
        logits = self.logits.detach()
        if hasattr(logits, "full_tensor"):
            logits = logits.full_tensor()
        return candidate_major(logits).max(0).indices.view(logits.shape[:2])

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
        masked, self.last_regulariser, self.last_max_probability = sample_masked_weight(
            self.weight, self.logits, self.candidates, self.tau, self.kappa, self.hard
        )
        return F.linear(x, masked, self.bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, pattern={self.pattern}, "
            f"candidates={self.logits.shape[-1]}, source={self.source}"
        )
