"""Dense fine-tuning: every weight trained on the plain causal-LM loss.

The baseline that AST and MaskLLM are compared against at the same token budget, and the simplest
`TrainingMethod`, so the training loop is tested on its own. With `distill` it learns from a frozen
teacher (by default its own starting point) through the shared `Distiller`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from semisparse.errors import SemisparseError
from semisparse.models import load_model, load_tokenizer
from semisparse.registry import register
from semisparse.settings import setting
from semisparse.training.distill import Distiller, Teacher
from semisparse.training.method import MethodConfig, TrainingMethod


@dataclass
class DenseConfig(MethodConfig):
    """Dense fine-tuning: which parameters train and decay, and optional distillation from a teacher."""

    owner: ClassVar[str] = "dense"

    decay_norms_and_biases: bool = setting(
        False, "apply weight decay to 1-D parameters (norm gains, biases) too; off as in most LM recipes"
    )
    train_embeddings: bool = setting(
        True, "train the input embeddings (and a tied LM head); false saves their optimizer state"
    )
    distill: bool = setting(False, "distil from a frozen teacher: alpha_task · CE + alpha_kl · T² · KL")
    teacher: str | None = setting(None, "teacher model name or directory (none: the starting model)")
    alpha_task: float = setting(1.0, "weight of the cross-entropy term when distilling", minimum=0)
    alpha_kl: float = setting(1.0, "weight of the KL term when distilling", minimum=0)
    temperature: float = setting(2.0, "distillation temperature T", above=0)

    def check(self) -> None:
        if self.distill and self.alpha_task == 0 and self.alpha_kl == 0:
            raise SemisparseError(
                "`alpha_task` and `alpha_kl` are both 0, so there is no loss: raise one of them"
            )


@register(
    "trainer",
    "dense",
    DenseConfig,
    summary="Dense fine-tuning of all weights (the baseline at the same token budget).",
)
class DenseMethod(TrainingMethod):
    """Plain next-token cross-entropy on all (trainable) weights, or distillation with `distill`."""

    name = "dense"

    def __init__(
        self,
        model: nn.Module,
        settings: DenseConfig,
        base_model: str,
        tokenizer: Any = None,
        teacher: Teacher | None = None,
    ) -> None:
        self.model = model
        self.settings = settings
        self.base_model = base_model
        self.tokenizer = tokenizer
        self.distiller = (
            Distiller(teacher, settings.alpha_task, settings.alpha_kl, settings.temperature)
            if settings.distill
            else None
        )
        if not settings.train_embeddings:
            model.get_input_embeddings().requires_grad_(False)

    @property
    def teacher(self) -> Teacher | None:
        return self.distiller.teacher if self.distiller is not None else None

    @classmethod
    def from_pretrained(
        cls,
        model_name: str,
        settings: DenseConfig,
        total_steps: int,
        device: str,
        seed: int = 0,
        initialise: bool = True,
        progress: bool = True,
    ) -> DenseMethod:
        """Load the model in fp32 (the loop adds bf16 autocast on GPU), and the teacher when distilling."""
        teacher = None
        if settings.distill and settings.alpha_kl > 0 and settings.teacher is not None:
            Teacher.check_source(settings.teacher)
        model = load_model(model_name, dtype=torch.float32, device=device)
        if settings.distill and settings.alpha_kl > 0:
            teacher = Teacher.from_model(settings.teacher or model, model, device)
        return cls(model, settings, model_name, load_tokenizer(model_name), teacher)

    def parameter_groups(self) -> list[dict[str, Any]]:
        decay, plain = [], []
        for param in self.model.parameters():
            if not param.requires_grad:
                continue
            (decay if param.dim() >= 2 or self.settings.decay_norms_and_biases else plain).append(param)
        groups: list[dict[str, Any]] = [{"params": decay}]
        if plain:
            groups.append({"params": plain, "weight_decay": 0.0})
        return groups

    def loss(self, batch: torch.Tensor, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        if self.distiller is not None:
            return self.distiller.loss(self.model, batch)
        loss = self.model(input_ids=batch, labels=batch, use_cache=False).loss
        return loss, {}

    def export(self, out_tmp_dir: Path) -> dict[str, Any]:
        self.model.save_pretrained(out_tmp_dir, safe_serialization=True)
        return {
            "method": self.name,
            "base_model": self.base_model,
            "settings": self.settings.to_dict(),
            **({"teacher": self.teacher.source} if self.teacher is not None else {}),
        }
