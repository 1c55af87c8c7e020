"""Distillation for sparse retraining: the dense model teaches its sparse copy (`../shared/METHODS.md` §2.4).

Everything is computed in float32 (logits from bf16 autocast would lose the small probabilities that
carry the teacher's knowledge). The last position has no next token, so it is left out of both terms.

The logit loss is one autograd function that walks the [tokens, vocabulary] logits a few rows at a time
and writes its gradient during the forward, in closed form:

    ∂/∂s = (α_task · (softmax(s) − onehot(target)) + α_kl · T · (softmax(s/T) − softmax(t/T))) / rows

Written with autograd ops, the same loss keeps five full-vocabulary fp32 copies alive and costs as much
as a third of a teacher forward on CPU; here the rows being worked on stay in cache.

`Teacher` (a frozen dense model, loaded from disk or copied from the student) and `Distiller` (the loss of
a student against it) are the one distillation component AST, MaskLLM and dense fine-tuning share.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from semisparse.errors import SemisparseError
from semisparse.models import load_model, resolve_model_path

# Rows per chunk: 8 rows of a 49k vocabulary are 1.5 MiB per fp32 temporary, which stays in cache; larger
# chunks were slower on CPU and smaller ones no faster.
CHUNK_ROWS = 8


def _chunk_terms(
    student: Tensor, teacher: Tensor | None, targets: Tensor, alpha_task: float, alpha_kl: float, t: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Summed CE and KL of a chunk of rows, and the chunk's gradient (not yet divided by the row count).

    Three exponentials per logit and no logarithm of the vocabulary: with z = s − max s,
    CE = log Σ e^z − z_target, and since the teacher's probabilities q sum to one,
    KL(q ‖ q_s) = Σ q (t − s) / T − (max t − max s) / T − log Σ e^{(t − max t)/T} + log Σ e^{z/T}.
    `student` and `teacher` may be the caller's own fp32 tensors, so they are only read, never written.
    """
    logits = student.float()
    top = logits.amax(-1, keepdim=True)
    shifted = logits - top
    shifted_target = shifted.gather(-1, targets[:, None])
    tempered = shifted.mul(1 / t).exp_() if teacher is not None else None
    grad = shifted.exp_()
    norm = grad.sum(-1, keepdim=True)
    task = (norm.log() - shifted_target).sum()
    grad.mul_(alpha_task / norm)
    grad.scatter_add_(-1, targets[:, None], torch.full_like(targets[:, None], -alpha_task, dtype=grad.dtype))
    kl = grad.new_zeros(())
    if teacher is not None and tempered is not None:
        teacher = teacher.float()
        teacher_top = teacher.amax(-1, keepdim=True)
        q_teacher = (teacher - teacher_top).mul_(1 / t).exp_()
        norm_teacher = q_teacher.sum(-1, keepdim=True)
        norm_student = tempered.sum(-1, keepdim=True)
        q_teacher.div_(norm_teacher)
        gap = torch.linalg.vecdot(q_teacher, teacher) - torch.linalg.vecdot(q_teacher, logits)
        kl = ((gap[:, None] - teacher_top + top) / t - norm_teacher.log() + norm_student.log()).sum()
        grad.addcmul_(tempered, alpha_kl * t / norm_student).sub_(q_teacher, alpha=alpha_kl * t)
    return task, kl, grad


class _LogitDistillation(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        student: Tensor,
        teacher: Tensor | None,
        input_ids: Tensor,
        alpha_task: float,
        alpha_kl: float,
        temperature: float,
    ) -> tuple[Tensor, Tensor, Tensor]:
        batch, positions, _ = student.shape
        rows = batch * (positions - 1)
        grad = torch.empty_like(student)
        grad[:, -1] = 0
        task = torch.zeros((), dtype=torch.float32, device=student.device)
        kl = torch.zeros_like(task)
        with torch.no_grad(), torch.autocast(student.device.type, enabled=False):
            for b in range(batch):
                for start in range(0, positions - 1, CHUNK_ROWS):
                    end = min(start + CHUNK_ROWS, positions - 1)
                    part = _chunk_terms(
                        student[b, start:end],
                        None if teacher is None else teacher[b, start:end],
                        input_ids[b, start + 1 : end + 1],
                        alpha_task,
                        alpha_kl,
                        temperature,
                    )
                    task += part[0]
                    kl += part[1]
                    grad[b, start:end] = part[2].div_(rows)
        task, kl = task / rows, kl / rows
        ctx.grad = grad
        ctx.mark_non_differentiable(task, kl)
        return alpha_task * task + alpha_kl * temperature**2 * kl, task, kl

    @staticmethod
    def backward(ctx: Any, grad_loss: Tensor, *_: Tensor) -> tuple[Tensor, None, None, None, None, None]:
        grad, ctx.grad = ctx.grad, None
        if grad is None:
            raise RuntimeError("the distillation loss was already backpropagated: recompute it first")
        return grad.mul_(grad_loss.to(grad.dtype)), None, None, None, None, None


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
    if teacher_logits is None and alpha_kl:
        raise ValueError("alpha_kl > 0 needs teacher logits")
    if teacher_logits is not None and teacher_logits.shape != student_logits.shape:
        raise ValueError(
            f"teacher logits {tuple(teacher_logits.shape)} do not match "
            f"student logits {tuple(student_logits.shape)}"
        )
    teacher = teacher_logits.detach() if teacher_logits is not None and alpha_kl else None
    loss, task, kl = _LogitDistillation.apply(
        student_logits, teacher, input_ids, float(alpha_task), float(alpha_kl), float(temperature)
    )
    metrics = {"loss_task": task.item()}
    if teacher is not None:
        metrics["loss_kl"] = kl.item()
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


def _vocab(model: nn.Module) -> int:
    return model.get_output_embeddings().weight.shape[0]


class Teacher:
    """A frozen dense model whose logits (and block outputs) a student is pulled towards.

    It only runs forward, so on a GPU it is kept in bfloat16; elsewhere in float32. Build it with
    `from_model`: from a model name or directory (loaded from disk) or from the student itself (a frozen
    copy, taken before the student changes).
    """

    def __init__(self, model: nn.Module, source: str) -> None:
        self.model = model.requires_grad_(False).eval()
        self.source = source

    @staticmethod
    def check_source(name: str) -> None:
        """Fail early, before any slow set-up, when a teacher name points nowhere."""
        try:
            resolve_model_path(name)
        except SemisparseError as err:
            raise SemisparseError(f"teacher: {err}") from err

    @classmethod
    def from_model(
        cls,
        name_or_student: str | nn.Module,
        student: nn.Module | None = None,
        device: str | torch.device | None = None,
    ) -> Teacher:
        """The teacher from a model name/directory, or a frozen copy of the module `name_or_student`.

        `student` (when given) must predict the same vocabulary. `device` defaults to the student's.
        """
        reference = student if student is not None else name_or_student
        if device is None and isinstance(reference, nn.Module):
            device = next(reference.parameters()).device
        on_gpu = device is not None and torch.device(device).type == "cuda"
        if isinstance(name_or_student, nn.Module):
            model = copy.deepcopy(name_or_student)
            if on_gpu:
                model = model.to(torch.bfloat16)
            source = "the initial student"
        else:
            cls.check_source(name_or_student)
            dtype = torch.bfloat16 if on_gpu else torch.float32
            model = load_model(name_or_student, dtype=dtype, device=device)
            source = name_or_student
        if student is not None and _vocab(model) != _vocab(student):
            raise SemisparseError(
                f"teacher {source} has {_vocab(model)} output tokens, the student {_vocab(student)}: "
                "use a teacher of the same family"
            )
        return cls(model, source)

    def __call__(self, input_ids: Tensor, hidden_states: bool = False) -> Any:
        """The teacher's outputs (logits, and block outputs with `hidden_states`), without gradients."""
        with torch.no_grad():
            return self.model(input_ids=input_ids, output_hidden_states=hidden_states, use_cache=False)


@dataclass
class Distiller:
    """A student's loss against an optional `Teacher`:

    `alpha_task` · CE + `alpha_kl` · T² · KL at `temperature` T (`distillation_loss`), plus `layerwise`
    times the block-output term (`layerwise_loss`). Without a teacher, `alpha_kl` and `layerwise` must be
    0 and the loss is `alpha_task` · CE.
    """

    teacher: Teacher | None = None
    alpha_task: float = 1.0
    alpha_kl: float = 0.0
    temperature: float = 2.0
    layerwise: float = 0.0

    def __post_init__(self) -> None:
        if self.teacher is None and (self.alpha_kl or self.layerwise):
            raise ValueError("alpha_kl or layerwise > 0 needs a teacher")

    @property
    def needs_teacher(self) -> bool:
        return self.alpha_kl > 0 or self.layerwise > 0

    def loss(self, student: nn.Module, input_ids: Tensor) -> tuple[Tensor, dict[str, float]]:
        """Run the student (and the teacher) on `input_ids` [batch, seq]; the loss and its parts."""
        hidden = self.layerwise > 0
        output = student(input_ids=input_ids, output_hidden_states=hidden, use_cache=False)
        taught = self.teacher(input_ids, hidden) if self.teacher is not None else None
        loss, metrics = distillation_loss(
            output.logits,
            taught.logits if taught is not None and self.alpha_kl > 0 else None,
            input_ids,
            self.alpha_task,
            self.alpha_kl,
            self.temperature,
        )
        if hidden:
            assert taught is not None
            extra = layerwise_loss(output.hidden_states[1:], taught.hidden_states[1:])
            loss = loss + self.layerwise * extra
            metrics["loss_layerwise"] = extra.item()
            metrics["loss"] = loss.item()
        return loss, metrics
