"""How a training run's settings are put together, and `train`, the one entry point for Python and the CLI.

A run is a `TrainConfig` plus the config of a registered trainer (`semisparse.registry`, kind "trainer").
They are merged from, lowest precedence first:

1. `TrainConfig`'s defaults;
2. the trainer's own training defaults (`MethodConfig.train_defaults`, e.g. MaskLLM's lr and warm-up);
3. a YAML recipe: `TrainConfig` fields at the top level, the trainer's settings under `method:`;
4. explicit values: `overrides` for `TrainConfig` fields, `method_settings` for the trainer's settings.

Example::

    from semisparse.training import train
    train("ast", model="smollm2-135m", output="runs/ast", tokens="100M", settings={"slorb": True})
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from semisparse import registry
from semisparse.errors import SemisparseError
from semisparse.models import DEFAULT_MODEL
from semisparse.training import loop
from semisparse.training.config import TrainConfig, read_yaml_mapping
from semisparse.training.loop import MethodFactory, TrainingMethod
from semisparse.training.method import MethodConfig

_MERGED_FIELDS = ("method", "method_name")


def train_configs(
    method: str,
    recipe: str | Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    method_settings: Mapping[str, Any] | None = None,
) -> tuple[TrainConfig, MethodConfig]:
    """The validated `TrainConfig` and trainer config of a run of the registered trainer `method`.

    `recipe`: a YAML file (`TrainConfig` fields, the trainer's settings under `method:`; a `method_name`
    in it must be `method`). `overrides`: `TrainConfig` fields, above the recipe. `method_settings`: the
    trainer's settings, above the recipe's `method:` section. Values may be strings (`"100M"`,
    `"1e-4"`, `"true"`): every config coerces them to the declared types. Without a model anywhere, the
    run trains the default model.
    """
    entry = registry.lookup("trainer", method)
    overrides = dict(overrides or {})
    misplaced = [f"`{name}`" for name in _MERGED_FIELDS if name in overrides]
    if misplaced:
        raise SemisparseError(
            f"{' and '.join(misplaced)} cannot be overridden: name the trainer as `method` and pass its "
            "settings as `method_settings`"
        )
    data: dict[str, Any] = dict(entry.config.train_defaults)
    section: dict[str, Any] = {}
    if recipe is not None:
        loaded = read_yaml_mapping(recipe)
        recipe_section = loaded.pop("method", None) or {}
        if not isinstance(recipe_section, Mapping):
            raise SemisparseError(f"the `method` section of {recipe} must be a mapping of {method} settings")
        recipe_method = loaded.pop("method_name", method)
        if recipe_method != method:
            raise SemisparseError(
                f"{recipe} is a {recipe_method} recipe, not a {method} one: train it with {recipe_method}"
            )
        data.update(loaded)
        section.update(recipe_section)
    data.update(overrides)
    if not data.get("model"):
        data["model"] = DEFAULT_MODEL
    method_config = entry.config.from_mapping({**section, **(method_settings or {})})
    config = TrainConfig.from_mapping({**data, "method_name": method, "method": method_config.to_dict()})
    return config, method_config


def method_factory(config: TrainConfig, method_config: MethodConfig, progress: bool = True) -> MethodFactory:
    """`make_method(total_steps, device, initialise)` for `loop.launch`, from the trainer's registry entry."""
    entry = registry.for_config(method_config, "trainer")

    def make_method(total_steps: int, device: str, initialise: bool) -> TrainingMethod:
        return entry.implementation.from_pretrained(
            config.model,
            method_config,
            total_steps,
            device,
            seed=config.seed,
            initialise=initialise,
            progress=progress,
        )

    return make_method


def train(
    method: str,
    recipe: str | Path | None = None,
    *,
    settings: Mapping[str, Any] | None = None,
    resume: str | Path | None = None,
    overwrite: bool = False,
    allow_schedule_change: bool = False,
    progress: bool = True,
    **overrides: Any,
) -> Path:
    """Train with the registered trainer `method` and export the model; returns the directory OUT/model.

    `overrides` are `TrainConfig` fields (`model`, `output`, `tokens`, `lr`, ...), `settings` the trainer's
    own (see `train_configs` for how they combine with `recipe`). `resume`: `"latest"`, a run directory or
    a checkpoint; `allow_schedule_change` lets the resumed run use another `lr`, `min_lr_ratio`,
    `warmup_steps` or `grad_clip` (logged as a `schedule_change` event). `overwrite` replaces an existing
    run in `output`: the new run is built beside it and swapped in at its first checkpoint, so the old run
    survives a new one that fails early. Under torchrun every process calls this. Raises
    `TrainingInterrupted` after checkpointing on SIGINT/SIGTERM.
    """
    if resume is not None and overwrite:
        raise SemisparseError("`resume` and `overwrite` contradict each other; pass only one")
    config, method_config = train_configs(method, recipe, overrides, settings)
    make_method = method_factory(config, method_config, progress)
    return loop.launch(
        config,
        make_method,
        resume=resume,
        overwrite=overwrite,
        progress=progress,
        allow_schedule_change=allow_schedule_change,
    )
