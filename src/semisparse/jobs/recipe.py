"""`Recipe`: stages (prune, train, quantize, compress, eval) run one after another into one directory.

A recipe is YAML like

    model: smollm2-135m             # optional; `run(model=...)` / `--model` override it
    stages:
      - prune: {method: sparsegpt, pattern: "2:4", nsamples: 128, seqlen: 2048}
      - quantize: {method: gptq, bits: 4}
      - compress:
      - eval: {dataset: wikitext2, max_windows: 16}

The whole recipe is validated (stage names, every key, every value) before anything is written. Running it
into OUT gives

    OUT/recipe.yaml         the resolved recipe (model filled in, values in their types)
    OUT/01-prune/ ...       each stage's output, written atomically by the stage's job
    OUT/semisparse.json     the provenance chain: per stage its name, config, input, output, seconds, data
                            files with sha256 and status; library versions; the final model. Rewritten
                            atomically after every stage.

A model-producing stage's model is the next stage's input; eval writes results.json and passes the model on.
`run(resume=True)` skips the stages recorded as finished with an identical config and continues with the
next one (a train stage from its own newest checkpoint); a finished stage whose config changed is an error.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from semisparse import registry
from semisparse.errors import SemisparseError
from semisparse.export import METADATA_FILE, writes_output
from semisparse.jobs.base import StageConfig
from semisparse.jobs.chain import (
    RECIPE_FILE,
    Chain,
    absolute,
    data_files,
    existing_chain,
    now,
    plain,
    relative,
    remove_tree,
    write_atomic,
)
from semisparse.models import DEFAULT_MODEL, looks_like_path

_TOP_KEYS = ("model", "stages")


@dataclass(frozen=True)
class RecipeStage:
    """One validated stage of a recipe: its registered name and its config."""

    name: str
    config: StageConfig

    def to_dict(self) -> dict[str, Any]:
        return {self.name: plain(self.config.to_dict())}


@dataclass(frozen=True)
class RecipeResult:
    """What `Recipe.run` did: the output directory, the final model, the chain, the stages run and skipped."""

    out: Path
    final_model: str  # the final model's directory (the base model when no stage produced one)
    provenance: dict[str, Any]
    ran: list[str]
    skipped: list[str]

    def summary(self) -> str:
        """One line: each stage's output directory and result."""
        parts = []
        for record in self.provenance["stages"]:
            note = " (done before)" if record["dir"] in self.skipped else ""
            text = f": {record['summary']}" if record.get("summary") else ""
            parts.append(f"{record['dir']}{text}{note}")
        return f"ran {self.out}: " + "; ".join(parts) + f"; final model {self.final_model}"


class Recipe:
    """A validated list of stages and an optional base model; `run` executes it into one directory."""

    def __init__(self, stages: Sequence[RecipeStage], model: str | None = None) -> None:
        if not stages:
            raise SemisparseError("the recipe has no stages: list at least one under `stages`")
        self.stages = list(stages)
        self.model = model

    # --- loading -------------------------------------------------------------------------------------
    @classmethod
    def from_mapping(cls, data: Any, source: str = "the recipe") -> Recipe:
        """Validate a whole recipe mapping; any mistake is one line naming the stage and the key."""
        if not isinstance(data, Mapping):
            raise SemisparseError(
                f"{source} must be a mapping with `stages` (a list of one-key mappings such as "
                f"- prune: {{...}}) and optionally `model`, got {type(data).__name__}"
            )
        unknown = sorted(str(key) for key in data if key not in _TOP_KEYS)
        if unknown:
            raise SemisparseError(f"unknown key(s) {', '.join(unknown)} in {source}; valid: model, stages")
        model = data.get("model")
        if model is not None and not isinstance(model, str):
            raise SemisparseError(f"the model in {source} must be a model name or directory, got {model!r}")
        items = data.get("stages")
        if not isinstance(items, list) or not items:
            raise SemisparseError(
                f"`stages` in {source} must be a non-empty list of one-key mappings such as - prune: {{...}}"
            )
        return cls([_parse_stage(index, item, source) for index, item in enumerate(items, 1)], model)

    @classmethod
    def from_yaml(cls, path: str | Path) -> Recipe:
        """Read and validate a recipe file."""
        file = Path(path).expanduser()
        if not file.is_file():
            raise SemisparseError(f"recipe {path} does not exist; check the path")
        try:
            data = yaml.safe_load(file.read_text())
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark is not None else ""
            raise SemisparseError(f"recipe {path} is not valid YAML{where}; fix the file") from None
        return cls.from_mapping(data, f"recipe {path}")

    def to_dict(self, model: str | None = None) -> dict[str, Any]:
        """The recipe as a mapping, with `model` (or the recipe's own) filled in."""
        return {"model": model or self.model, "stages": [stage.to_dict() for stage in self.stages]}

    def to_yaml(self, model: str | None = None) -> str:
        return yaml.safe_dump(self.to_dict(model), sort_keys=False)

    # --- running -------------------------------------------------------------------------------------
    @writes_output(refuse_existing=False)
    def run(
        self,
        model: str | None = None,
        *,
        out: str | Path,
        resume: bool = False,
        overwrite: bool = False,
        progress: bool = True,
    ) -> RecipeResult:
        """Run every stage into `out` (see the module doc); `model` overrides the recipe's model.

        `out` must be writable, and is locked against other writers for the whole run (see
        `export.output_lock`), before anything is loaded or written.
        """
        if resume and overwrite:
            raise SemisparseError("`resume` and `overwrite` contradict each other; pass only one")
        base = model or self.model or DEFAULT_MODEL
        _check_model(base)
        if Path(base).expanduser().exists():  # a local model is recorded by its absolute path
            base = str(Path(base).expanduser().absolute())
        root = Path(out).expanduser().absolute()
        chain = existing_chain(root, resume, overwrite)
        records = self._finished_stages(chain, base, root) if chain is not None else []
        done = len(records)
        if overwrite and root.exists():
            remove_tree(root)
        root.mkdir(parents=True, exist_ok=True)
        write_atomic(root / RECIPE_FILE, self.to_yaml(base))
        previous = {record["index"]: record for record in (chain or {}).get("stages", [])}
        state = Chain(root, base, records, chain)
        current = base if done == 0 else absolute(root, records[done - 1]["current_model"], base)
        ran = []
        for index, stage in enumerate(self.stages[done:], done + 1):
            current = _run_stage(index, stage, current, base, state, previous.get(index), progress)
            ran.append(state.chain["stages"][-1]["dir"])
        state.final(current)
        return RecipeResult(root, current, state.chain, ran, [record["dir"] for record in records])

    def _finished_stages(self, chain: dict[str, Any], base: str, root: Path) -> list[dict[str, Any]]:
        """The records of the stages `chain` holds as finished, checked against this recipe's configs."""
        if chain.get("base_model") != base:
            raise SemisparseError(
                f"{root} was run from model {chain.get('base_model')}, not {base}: pass that model, "
                "or `overwrite` to start over, or choose another `out`"
            )
        finished = [record for record in chain.get("stages", []) if record.get("status") == "finished"]
        if len(finished) > len(self.stages):
            raise SemisparseError(
                f"{root} holds {len(finished)} finished stages, the recipe has {len(self.stages)}: "
                "pass `overwrite` to start over or choose another `out`"
            )
        for record, stage in zip(finished, self.stages, strict=False):
            if not _same(record, stage):
                raise SemisparseError(
                    f"stage {record.get('index')} ({record.get('name')}) in {root} finished with another "
                    f"config ({_difference(record, stage)}): restore it, or pass `overwrite` to start over, "
                    "or choose another `out`"
                )
        return finished


def _run_stage(
    index: int,
    stage: RecipeStage,
    current: str,
    base: str,
    state: Chain,
    earlier: dict[str, Any] | None,
    progress: bool,
) -> str:
    """Run one stage into `OUT/NN-name`, recording it in the chain before and after; returns the model
    the next stage starts from. An unfinished earlier record of the same stage and config lets the stage
    resume (training continues from its checkpoints); any leftover directory is replaced."""
    entry = registry.lookup("stage", stage.name)
    implementation = entry.implementation
    root = state.root
    folder = f"{index:02d}-{stage.name}"
    target = root / folder
    record: dict[str, Any] = {
        "index": index,
        "name": stage.name,
        "dir": folder,
        "config": plain(stage.config.to_dict()),
        "input": relative(root, current),
        "status": "running",
        "started": now(),
    }
    state.set(record)
    began = time.perf_counter()
    try:
        metadata = implementation.run(
            stage.config,
            current,
            target,
            base,
            overwrite=target.exists(),
            resume=earlier is not None and _same(earlier, stage),
            progress=progress,
        )
    except BaseException as err:
        record.update(status="failed", error=str(err) or type(err).__name__, finished=now())
        record["seconds"] = round(time.perf_counter() - began, 2)
        state.set(record)
        raise
    produced = implementation.model_dir(target) if implementation.produces_model else None
    if produced is not None:
        current = str(produced)
    record.update(
        status="finished",
        finished=now(),
        seconds=round(time.perf_counter() - began, 2),
        output=folder,
        model=relative(root, str(produced)) if produced is not None else None,
        current_model=relative(root, current),
        metadata=relative(root, str(produced / METADATA_FILE)) if produced is not None else None,
        results=f"{folder}/{metadata['results']}" if metadata.get("results") else None,
        summary=implementation.summary(metadata),
        data=data_files(metadata),
        chained=metadata.get("chained"),
        versions=metadata.get("versions"),
    )
    state.set(record)
    return current


def _check_model(model: str) -> None:
    """A path-like model that does not exist fails before anything is written (hub ids and aliases pass)."""
    if not Path(model).expanduser().exists() and looks_like_path(model):
        raise SemisparseError(f"model path {model} does not exist; check the path or `model`")


def _parse_stage(index: int, item: Any, source: str) -> RecipeStage:
    where = f"stage {index} of {source}"
    if isinstance(item, str):
        name, values = item, None
    elif isinstance(item, Mapping) and len(item) == 1:
        ((name, values),) = item.items()
    else:
        raise SemisparseError(
            f"{where} must be one stage name mapped to its settings, e.g. - prune: {{method: sparsegpt}}, "
            f"got {item!r:.80}"
        )
    if not isinstance(name, str):
        raise SemisparseError(f"{where}: the stage name must be a string, got {name!r}")
    try:
        entry = registry.lookup("stage", name)
        return RecipeStage(name, entry.config.from_mapping(values))
    except SemisparseError as err:
        raise SemisparseError(f"{where} ({name}): {err}") from None


def _identity(name: str, config: Mapping[str, Any]) -> dict[str, Any]:
    """What decides a stage's result: its recorded config without the stage's runtime fields."""
    runtime = registry.lookup("stage", name).config.runtime_fields
    return {key: value for key, value in plain(dict(config)).items() if key not in runtime}


def _same(record: Mapping[str, Any], stage: RecipeStage) -> bool:
    """Whether a chain record is of this stage with the same config (runtime fields aside)."""
    if record.get("name") != stage.name or not isinstance(record.get("config"), Mapping):
        return False
    return _identity(stage.name, record["config"]) == _identity(stage.name, stage.config.to_dict())


def _difference(record: Mapping[str, Any], stage: RecipeStage) -> str:
    if record.get("name") != stage.name:
        return f"it was {record.get('name')}, the recipe now has {stage.name}"
    old = _identity(stage.name, record.get("config") or {})
    new = _identity(stage.name, stage.config.to_dict())
    changed = sorted(key for key in {*old, *new} if old.get(key) != new.get(key))
    shown = [f"{key}: {old.get(key)!r} -> {new.get(key)!r}" for key in changed[:3]]
    return ", ".join(shown) + (", ..." if len(changed) > 3 else "")
