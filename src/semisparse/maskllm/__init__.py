"""MaskLLM (Fang et al., NeurIPS 2024): learn an N:M mask per layer while the dense weights stay frozen.

`layer` holds the differentiable mask layer, `candidates` the C(M, N) masks of a group, `prior` the
initialisation from a one-shot mask, `swap` the model-level attach/detach and diagnostics, and `jobs` the
mask-file commands. The trainer itself is `semisparse.methods.maskllm.MaskLLMMethod`.
"""

from semisparse.maskllm.candidates import candidate_count, candidate_masks
from semisparse.maskllm.layer import LearnableMaskLinear
from semisparse.maskllm.prior import one_shot_masks, prior_logits
from semisparse.maskllm.swap import (
    attach_learnable_masks,
    detach_learnable_masks,
    final_masks,
    flip_fraction,
    learnable_layers,
    mean_max_probability,
    memory_per_weight,
    regulariser,
    set_schedule,
)

__all__ = [
    "LearnableMaskLinear",
    "attach_learnable_masks",
    "candidate_count",
    "candidate_masks",
    "detach_learnable_masks",
    "final_masks",
    "flip_fraction",
    "learnable_layers",
    "mean_max_probability",
    "memory_per_weight",
    "one_shot_masks",
    "prior_logits",
    "regulariser",
    "set_schedule",
]
