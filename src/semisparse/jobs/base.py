"""What every stage shares: its typed config (`StageConfig`) and its implementation (`Stage`).

A stage is registered once, as kind "stage", with its config class and its implementation:

    @register("stage", "prune", PruneStageConfig, summary="One-shot pruning ...")
    class PruneStage(Stage):
        @classmethod
        def run(cls, config, input_model, out, base_model, *, overwrite=False, resume=False, progress=True):
            ...  # writes the output directory `out`, returns its semisparse.json content

A stage that runs a registered technique (a pruner, a quantizer) takes the technique's settings flattened
into its own mapping (`{method: sparsegpt, pattern: "2:4", blocksize: 128, nsamples: 128}`); the
technique's own config class validates them, so a mistyped key lists every valid one. The stage keeps the
settings as given (coerced to their types, defaults left to the technique), so a recipe written back out
reads the same and a default chosen at run time (e.g. AST's `slorb_init: auto`) stays a run-time choice.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Self

from semisparse import registry
from semisparse.data import CALIBRATION_SOURCES
from semisparse.errors import SemisparseError
from semisparse.settings import Settings, coerce, setting


def field_names(cls: type) -> list[str]:
    return [item.name for item in dataclasses.fields(cls)]


def given_values(config_class: type, values: Mapping[str, Any]) -> dict[str, Any]:
    """The explicitly given `values` coerced to the declared types of `config_class`, nothing else.

    Call it after `config_class.from_mapping(values)` succeeded (that is where mistakes are reported);
    unlike the config's `to_dict`, it neither fills in defaults nor applies the cross-field `check()`.
    """
    hints = typing.get_type_hints(config_class)
    return {key: coerce(value, hints[key]) for key, value in values.items()}


def normalised_mapping(values: Mapping[str, Any] | None, owner: str) -> dict[str, Any]:
    """A stage's mapping with `-` in keys read as `_`; None (a bare `- compress:`) is empty."""
    if values is None:
        return {}
    if not isinstance(values, Mapping):
        raise SemisparseError(
            f"the settings of the {owner} must be a mapping of name: value, got {type(values).__name__}"
        )
    return {str(key).replace("-", "_"): value for key, value in values.items()}


@dataclass
class StageConfig(Settings):
    """Base of a stage's config; `None` (a bare `- compress:` in YAML) means all defaults.

    `runtime_fields` may change between an interrupted run and its resumption (where, not what, it runs).
    """

    owner: ClassVar[str] = "stage"
    runtime_fields: ClassVar[tuple[str, ...]] = ("device",)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any] | None) -> Self:
        return super().from_mapping(normalised_mapping(values, cls.owner))


def check_calibration_source(source: str) -> None:
    """A calibration source that can never load fails before anything runs (the mirror is checked later)."""
    if source not in CALIBRATION_SOURCES and not Path(source).expanduser().is_file():
        raise SemisparseError(
            f"unknown calibration source '{source}'; "
            f"use {', '.join(CALIBRATION_SOURCES)} or a .txt/.jsonl file"
        )


@dataclass
class TechniqueStageConfig(StageConfig):
    """A stage that runs the registered technique `method` of kind `technique_kind` with `settings`.

    In a recipe the technique's settings are flattened into the stage's mapping; `settings` holds them.
    """

    technique_kind: ClassVar[str] = ""

    method: str = setting("", "the registered technique to run")
    settings: dict[str, Any] = setting({}, "the technique's own settings (flattened in a recipe)")

    def check(self) -> None:
        if not isinstance(self.settings, Mapping):
            raise SemisparseError(f"the {self.owner}'s `settings` must be a mapping of name: value")
        entry = registry.lookup(self.technique_kind, self.method)
        given = normalised_mapping(self.settings, self.owner)
        entry.config.from_mapping(given)  # the technique's own validation, with its messages
        self.settings = given_values(entry.config, given)

    def technique(self) -> Any:
        """The validated config of the technique, defaults filled in."""
        return registry.lookup(self.technique_kind, self.method).config.from_mapping(self.settings)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any] | None) -> Self:
        """The stage's own keys and the technique's settings from one flat mapping."""
        values = normalised_mapping(values, cls.owner)
        own = [name for name in field_names(cls) if name != "settings"]
        method = values.get("method", next(f.default for f in dataclasses.fields(cls) if f.name == "method"))
        if not isinstance(method, str):
            raise SemisparseError(
                f"{cls.owner} `method`={method!r} must name a {cls.technique_kind}: "
                f"one of {', '.join(registry.names(cls.technique_kind))}"
            )
        theirs = field_names(registry.lookup(cls.technique_kind, method).config)
        unknown = sorted(key for key in values if key not in own and key not in theirs)
        if unknown:
            raise SemisparseError(
                f"unknown {cls.owner} setting(s) {', '.join(unknown)}; valid: {', '.join(own)}, "
                f"and {method}'s {', '.join(theirs) or '(none)'}"
            )
        # A name both declare (none today) goes to both, so it means the same thing everywhere.
        settings = {key: value for key, value in values.items() if key in theirs}
        return cls(**{key: value for key, value in values.items() if key in own}, settings=settings)

    def to_dict(self) -> dict[str, Any]:
        """The flat form a recipe writes: the stage's own fields, then the technique's given settings."""
        data = {key: value for key, value in super().to_dict().items() if key != "settings"}
        return {**data, **self.settings}


class Stage:
    """Base of a stage's implementation; registered under kind "stage" with its config class.

    `produces_model`: the stage writes a model the next stage starts from (eval does not: the next stage
    keeps the previous model). `run` writes the stage's output directory `out` (atomically through the
    existing jobs) and returns its `semisparse.json` content; `input_model` is the model the stage starts
    from, `base_model` the recipe's original (dense) model. `overwrite` replaces an existing `out`;
    `resume` asks a stage that can continue an interrupted run (training) to do so from `out`.
    """

    produces_model: ClassVar[bool] = True

    @classmethod
    def run(
        cls,
        config: Any,
        input_model: str,
        out: Path,
        base_model: str,
        *,
        overwrite: bool = False,
        resume: bool = False,
        progress: bool = True,
    ) -> dict[str, Any]:
        raise NotImplementedError

    @classmethod
    def model_dir(cls, out: Path) -> Path:
        """Where the produced model lies inside `out` (a training run keeps it in `out/model`)."""
        return out

    @classmethod
    def summary(cls, metadata: dict[str, Any]) -> str:
        """A few words about the result, for the one-line summary of `semisparse run`."""
        return ""


def run_stage(
    name: str,
    config: StageConfig,
    input_model: str,
    out: str | Path,
    base_model: str | None = None,
    *,
    overwrite: bool = False,
    resume: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Run the registered stage `name` once, outside a recipe (what `semisparse prune` etc. do)."""
    entry = registry.lookup("stage", name)
    if type(config) is not entry.config:
        raise TypeError(f"the {name} stage takes a {entry.config.__name__}, not a {type(config).__name__}")
    return entry.implementation.run(
        config,
        input_model,
        Path(out).expanduser(),
        base_model or input_model,
        overwrite=overwrite,
        resume=resume,
        progress=progress,
    )
