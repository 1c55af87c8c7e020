"""The train stage: a run of a registered trainer (ast, maskllm, dense) through `semisparse.training.train`.

Its mapping holds the trainer's name as `method`, `TrainConfig` fields (`tokens`, `seq_len`, `lr`, ...)
and the trainer's own settings, all flattened (a trainer setting whose name a `TrainConfig` field also
uses would go under `method_settings:`; none does today). `model` and `output` come from the recipe.

What the stage trains depends on the model it receives (`input_model`) and the recipe's dense `base_model`:

* ast: after a stage that left an N:M-pruned model, that model becomes `init` (unless `init` is set) and
  the student's dense reference and teacher stay the base model; otherwise it trains the input model from
  its `init` pruner.
* maskllm: after an N:M-pruned model, the masks are learned on the base model's dense weights with the
  pruned model's nonzeros as the prior (written to `OUT/NN-train-prior-masks.npz`; unless `prior_mask`
  is set); otherwise it learns masks of the input model with its `prior` pruner.
* dense: fine-tunes the input model.

The run directory is the stage's directory (config.yaml, metrics.jsonl, checkpoints/), the model is in its
`model/`; an interrupted stage resumes from its newest checkpoint.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Self

from semisparse import registry
from semisparse.errors import SemisparseError
from semisparse.export import METADATA_FILE, read_metadata
from semisparse.jobs.base import Stage, StageConfig, given_values, normalised_mapping
from semisparse.jobs.masks import export_mask_file
from semisparse.registry import register
from semisparse.settings import setting
from semisparse.training import train
from semisparse.training.checkpoint import list_checkpoints
from semisparse.training.config import TrainConfig
from semisparse.training.recipe import train_configs

# TrainConfig fields the recipe decides, not the stage.
_FROM_RECIPE = ("model", "output", "method_name", "method")
NESTED_KEY = "method_settings"
MODEL_DIR = "model"  # semisparse.training.loop.MODEL_DIR, kept here so this module stays import-light


def train_fields() -> list[str]:
    return [item.name for item in dataclasses.fields(TrainConfig) if item.name not in _FROM_RECIPE]


@dataclass
class TrainStageConfig(StageConfig):
    """A training run: the trainer `method`, `TrainConfig` fields (`training`) and its settings."""

    owner: ClassVar[str] = "train stage"

    method: str = setting("ast", "the registered trainer: ast, maskllm, dense")
    training: dict[str, Any] = setting(
        {}, "TrainConfig fields: tokens, seq_len, lr, ... (flattened in a recipe)"
    )
    settings: dict[str, Any] = setting({}, "the trainer's own settings (flattened in a recipe)")

    def check(self) -> None:
        for name, value in (("training", self.training), ("settings", self.settings)):
            if not isinstance(value, Mapping):
                raise SemisparseError(f"the train stage's `{name}` must be a mapping of name: value")
        entry = registry.lookup("trainer", self.method)
        placed = [f"`{name}`" for name in _FROM_RECIPE if name in self.training]
        if placed:
            raise SemisparseError(
                f"the train stage takes {' and '.join(placed)} from the recipe: remove it from the stage"
            )
        overrides = {**self.training, "model": "recipe-model", "output": "recipe-stage-dir"}
        config, _ = train_configs(self.method, overrides=overrides, method_settings=self.settings)
        resolved = config.to_dict()
        self.training = {key: resolved[key] for key in self.training}
        self.settings = given_values(entry.config, self.settings)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any] | None) -> Self:
        """`method`, then each key to `TrainConfig` or to the trainer, by name; unknown keys list both."""
        values = normalised_mapping(values, cls.owner)
        method = values.pop("method", "ast")
        if not isinstance(method, str):
            raise SemisparseError(
                f"train stage `method`={method!r} must name a trainer: "
                f"one of {', '.join(registry.names('trainer'))}"
            )
        theirs = [item.name for item in dataclasses.fields(registry.lookup("trainer", method).config)]
        nested = normalised_mapping(values.pop(NESTED_KEY, None), f"train stage's {NESTED_KEY}")
        ours = train_fields()
        recipe_owned = [f"`{name}`" for name in _FROM_RECIPE if name in values]
        if recipe_owned:
            raise SemisparseError(
                f"the train stage takes {' and '.join(recipe_owned)} from the recipe: remove it"
            )
        unknown = sorted(key for key in values if key not in ours and key not in theirs)
        unknown += sorted(f"{NESTED_KEY}.{key}" for key in nested if key not in theirs)
        if unknown:
            raise SemisparseError(
                f"unknown train stage setting(s) {', '.join(unknown)}; valid: method, {', '.join(ours)}, "
                f"and {method}'s {', '.join(theirs) or '(none)'}"
            )
        training = {key: value for key, value in values.items() if key in ours}
        settings = {key: value for key, value in values.items() if key not in ours}
        return cls(method=method, training=training, settings={**settings, **nested})

    def to_dict(self) -> dict[str, Any]:
        """The flat form a recipe writes; a trainer setting named like a TrainConfig field stays nested."""
        fields = set(train_fields())
        nested = {key: value for key, value in self.settings.items() if key in fields}
        flat = {key: value for key, value in self.settings.items() if key not in fields}
        return {"method": self.method, **self.training, **flat, **({NESTED_KEY: nested} if nested else {})}


def _nm_pattern_of(model: str) -> str | None:
    """The N:M pattern a semisparse model directory was saved with, or None (dense, or not ours)."""
    meta = read_metadata(model) if Path(model).expanduser().is_dir() else None
    return (meta or {}).get("pattern")


def chained_inputs(
    config: TrainStageConfig, input_model: str, out: Path, base_model: str
) -> tuple[str, dict[str, Any]]:
    """The model to train and the trainer settings the previous stage decides (see the module doc)."""
    pruned = input_model != base_model and _nm_pattern_of(input_model) is not None
    if config.method == "ast" and pruned and "init" not in config.settings:
        return base_model, {"init": input_model}
    if config.method == "maskllm" and pruned and "prior_mask" not in config.settings:
        masks = out.with_name(f"{out.name}-prior-masks.npz")
        export_mask_file(input_model, masks, overwrite=True)
        return base_model, {"prior_mask": str(masks)}
    return input_model, {}


@register("stage", "train", TrainStageConfig, summary="Retraining: AST, MaskLLM or dense fine-tuning.")
class TrainStage(Stage):
    """`semisparse.training.train` with the stage's directory as the run directory (model in `model/`)."""

    @classmethod
    def run(
        cls,
        config: TrainStageConfig,
        input_model: str,
        out: Path,
        base_model: str,
        *,
        overwrite: bool = False,
        resume: bool = False,
        progress: bool = True,
    ) -> dict[str, Any]:
        finished = out / MODEL_DIR / METADATA_FILE
        if resume and finished.is_file():  # finished, but the recipe had not recorded it yet
            return {**(read_metadata(out / MODEL_DIR) or {}), "chained": {"resumed": "finished run"}}
        model, derived = chained_inputs(config, input_model, out, base_model)
        from_checkpoint = resume and out.is_dir() and bool(list_checkpoints(out))
        train(
            config.method,
            settings={**config.settings, **derived},
            resume="latest" if from_checkpoint else None,
            overwrite=not from_checkpoint and (overwrite or (resume and out.exists())),
            progress=progress,
            model=model,
            output=str(out),
            **config.training,
        )
        metadata = read_metadata(out / MODEL_DIR) or {}
        chained = {"model": model, **derived, "resumed_from_checkpoint": from_checkpoint}
        return {**metadata, "chained": chained}

    @classmethod
    def model_dir(cls, out: Path) -> Path:
        return out / MODEL_DIR

    @classmethod
    def summary(cls, metadata: dict[str, Any]) -> str:
        record = metadata.get("training") or {}
        text = f"{metadata.get('method')}, {record.get('steps')} steps, {record.get('tokens_seen')} tokens"
        final = record.get("final_eval") or {}
        if final.get("eval_ppl") is not None:
            text += f", perplexity {final['eval_ppl']:.2f}"
        return text
