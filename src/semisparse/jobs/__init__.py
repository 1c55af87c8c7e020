"""Jobs composed into recipes: each stage (prune, train, quantize, compress, eval) is a typed config
registered as kind "stage", bound to one implementation, and `Recipe` runs a list of them into one directory
with one provenance chain.

Importing `semisparse.jobs.stages` registers the built-in stages; `registry.lookup("stage", name)` does
that on first use. Kept import-light: `Recipe` is imported when first used.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Recipe": "semisparse.jobs.recipe",
    "RecipeResult": "semisparse.jobs.recipe",
    "Stage": "semisparse.jobs.base",
    "StageConfig": "semisparse.jobs.base",
    "run_stage": "semisparse.jobs.base",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
