"""The shared, resumable training loop that AST, MaskLLM and dense fine-tuning run on.

`train("ast", model=..., output=..., tokens="100M", settings={...})` runs a registered trainer from Python
(`recipe.train_configs` says how a recipe, defaults and explicit values combine); `TrainingMethod` and
`MethodConfig` are what a new trainer implements.

Kept import-light: nothing heavy is imported until a name below is used, because other modules of this
package (SR-STE, adaptive masks, distillation) are imported on their own by the methods.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "TrainConfig": "semisparse.training.config",
    "parse_tokens": "semisparse.training.config",
    "MethodConfig": "semisparse.training.method",
    "TrainingMethod": "semisparse.training.method",
    "default_optimizer": "semisparse.training.method",
    "Distiller": "semisparse.training.distill",
    "Teacher": "semisparse.training.distill",
    "TrainingInterrupted": "semisparse.training.loop",
    "launch": "semisparse.training.loop",
    "run": "semisparse.training.loop",
    "method_factory": "semisparse.training.recipe",
    "train": "semisparse.training.recipe",
    "train_configs": "semisparse.training.recipe",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
