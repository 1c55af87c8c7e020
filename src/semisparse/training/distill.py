"""Distillation losses for sparse retraining: the dense model teaches its sparse copy (METHODS.md §2.4).

Everything is computed in float32 (logits from bf16 autocast would lose the small probabilities that
carry the teacher's knowledge). The last position has no next token, so it is left out of both terms.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def distillation_loss(
    student_logits: Tensor,
    teacher_logits: Tensor | None,
    input_ids: Tensor,
    alpha_task: float,
    alpha_kl: float,
    temperature: float = 2.0,
) -> tuple[Tensor, dict[str, float]]:
    """`α_task · CE + α_kl · T² · KL(p_teacher^T ‖ p_student^T)`, both averaged over predicted tokens.

    `student_logits` / `teacher_logits` are [batch, seq, vocab]; `input_ids` [batch, seq] are the targets
    shifted by one inside. `teacher_logits` may be None only when `alpha_kl` is 0 (no teacher run).
    """
    vocab = student_logits.shape[-1]
    student = student_logits[:, :-1].float().reshape(-1, vocab)
    targets = input_ids[:, 1:].reshape(-1)
    task = F.cross_entropy(student, targets)
    metrics = {"loss_task": task.item()}
    loss = alpha_task * task
    if teacher_logits is not None:
        if teacher_logits.shape != student_logits.shape:
            raise ValueError(
                f"teacher logits {tuple(teacher_logits.shape)} do not match "
                f"student logits {tuple(student_logits.shape)}"
            )
        teacher = teacher_logits[:, :-1].float().reshape(-1, vocab)
        log_p_student = F.log_softmax(student / temperature, dim=-1)
        log_p_teacher = F.log_softmax(teacher / temperature, dim=-1)
        kl = F.kl_div(log_p_student, log_p_teacher, log_target=True, reduction="batchmean")
        metrics["loss_kl"] = kl.item()
        loss = loss + alpha_kl * temperature**2 * kl
    elif alpha_kl:
        raise ValueError("alpha_kl > 0 needs teacher logits")
    metrics["loss"] = loss.item()
    return loss, metrics


def layerwise_loss(student_hidden: Sequence[Tensor], teacher_hidden: Sequence[Tensor]) -> Tensor:
    """`Σ_l mean((h_s − h_t)²) / mean(h_t²)` over matching block outputs, in float32."""
    if len(student_hidden) != len(teacher_hidden):
        raise ValueError(
            f"{len(student_hidden)} student hidden states but {len(teacher_hidden)} teacher ones"
        )
    total = torch.zeros((), dtype=torch.float32, device=student_hidden[0].device)
    for student, teacher in zip(student_hidden, teacher_hidden, strict=True):
        teacher = teacher.detach().float()
        total = total + (student.float() - teacher).square().mean() / teacher.square().mean()
    return total
