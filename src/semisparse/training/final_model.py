"""The end of a run: the trained model written to OUT/model by `method.export`, with its provenance."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from semisparse.export import METADATA_FILE, atomic_directory, provenance
from semisparse.training import distributed
from semisparse.training.method import TrainingMethod


def unsharded_method(
    method: TrainingMethod,
    optimizer: torch.optim.Optimizer,
    info: distributed.Distributed,
    fsdp: bool,
    rebuild: Callable[[], TrainingMethod] | None,
) -> TrainingMethod:
    """The method to export from: `method` itself, or under FSDP (collective: call on every rank) a freshly
    built, unsharded copy on CPU (main rank) that the gathered weights and method state are loaded into."""
    if not fsdp:
        return method
    model_state, _ = distributed.full_state(method.model, optimizer, sharded=True)
    method_state = method.state_dict()
    if not info.is_main or rebuild is None:
        return method
    copy = rebuild()
    copy.model.load_state_dict(model_state)
    copy.load_state_dict(method_state)
    copy.model.eval()
    return copy


def write_model(
    target: Path,
    method: TrainingMethod,
    tokenizer: Any,
    base_model: str,
    base_pin: dict[str, Any],
    training: Callable[[], dict[str, Any]],
) -> None:
    """Main rank: `method.export` into `target` atomically, plus the tokenizer if the method wrote none and
    `semisparse.json` with the base model (`base_pin`: its resolved path and sha256) and the `training`
    record (taken once the export is written)."""
    with atomic_directory(target, overwrite=False) as tmp:
        method_meta = dict(method.export(tmp) or {})
        if not (tmp / "tokenizer_config.json").is_file():
            tokenizer.save_pretrained(tmp)
        method_meta.setdefault("method", method.name)
        method_meta.setdefault("base_model", base_model)
        if method_meta["base_model"] == base_model:
            method_meta.setdefault("base_model_path", base_pin["path"])
            method_meta.setdefault("base_model_sha256", base_pin["sha256"])
        metadata = provenance(**method_meta, training=training())
        (tmp / METADATA_FILE).write_text(json.dumps(metadata, indent=2, default=str) + "\n")
