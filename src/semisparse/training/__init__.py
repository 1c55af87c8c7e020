"""The shared, resumable training loop that AST, MaskLLM and dense fine-tuning run on.

Kept import-light: nothing heavy is imported until a name below is used, because other modules of this
package (SR-STE, adaptive masks, distillation) are imported on their own by the methods.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "TrainConfig": "semisparse.training.config",
    "parse_tokens": "semisparse.training.config",
    "TrainingMethod": "semisparse.training.loop",
    "TrainingInterrupted": "semisparse.training.loop",
    "default_optimizer": "semisparse.training.loop",
    "launch": "semisparse.training.loop",
    "run": "semisparse.training.loop",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
