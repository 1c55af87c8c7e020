"""Dense fine-tuning: every weight trained on the plain causal-LM loss.

The baseline that AST and MaskLLM are compared against at the same token budget, and the simplest
`TrainingMethod`, so the training loop is tested on its own.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from semisparse.errors import SemisparseError
from semisparse.models import load_model, load_tokenizer
from semisparse.training.config import TrainConfig
from semisparse.training.loop import default_optimizer


@dataclass
class DenseSettings:
    """`decay_norms_and_biases`: apply weight decay to 1-D parameters (norm gains, biases) too; off by
    default as in most LM recipes. `train_embeddings`: False freezes the input embeddings (and a tied
    LM head), which saves their optimizer state."""

    decay_norms_and_biases: bool = False
    train_embeddings: bool = True

    def __post_init__(self) -> None:
        for name in ("decay_norms_and_biases", "train_embeddings"):
            if not isinstance(getattr(self, name), bool):
                value = getattr(self, name)
                raise SemisparseError(f"dense setting {name} must be true or false (got {value!r})")


class DenseMethod:
    """Plain next-token cross-entropy on all (trainable) weights."""

    name = "dense"

    def __init__(self, model: nn.Module, settings: DenseSettings, base_model: str, tokenizer: Any = None):
        self.model = model
        self.settings = settings
        self.base_model = base_model
        self.tokenizer = tokenizer
        if not settings.train_embeddings:
            model.get_input_embeddings().requires_grad_(False)

    @classmethod
    def from_pretrained(
        cls,
        model_name: str,
        settings: DenseSettings,
        total_steps: int,
        device: str,
        seed: int = 0,
        initialise: bool = True,
        progress: bool = True,
    ) -> DenseMethod:
        """Load the model in fp32 (the loop adds bf16 autocast on GPU); nothing to initialise."""
        model = load_model(model_name, dtype=torch.float32, device=device)
        return cls(model, settings, model_name, load_tokenizer(model_name))

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

    def make_optimizer(self, groups: list[dict[str, Any]], config: TrainConfig) -> torch.optim.Optimizer:
        return default_optimizer(groups, config)

    def loss(self, batch: torch.Tensor, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        loss = self.model(input_ids=batch, labels=batch, use_cache=False).loss
        return loss, {}

    def before_step(self, step: int) -> dict[str, float]:
        return {}

    def after_step(self, step: int) -> dict[str, float]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None

    def export(self, out_tmp_dir: Path) -> dict[str, Any]:
        self.model.save_pretrained(out_tmp_dir, safe_serialization=True)
        return {
            "method": self.name,
            "base_model": self.base_model,
            "settings": dataclasses.asdict(self.settings),
        }
