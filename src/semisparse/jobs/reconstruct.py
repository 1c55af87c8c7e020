"""The reconstruct job and stage: block-wise reconstruction of a pruned model, resumable at block boundaries.

`reconstruct_to_dir(MODEL, PRUNED, OUT, config)` (what `semisparse reconstruct` and the recipe stage run):

* MODEL is the dense model, which supplies the targets. PRUNED is the sparse start: a pruned model
  directory (any pruner; its shapes and N:M pattern are checked against MODEL), a registered pruner (MODEL
  is pruned first with it, on the same calibration windows) or a `.npz` mask file in the MaskLLM format
  (applied to MODEL, checked like `apply-mask`). Every check runs before anything is written.
* While it runs, the work directory `OUT.partial/` beside OUT holds `state.json` (the config, the inputs,
  the finished blocks' reports), `metrics.jsonl`, each finished block's target weights
  (`block-NNNN.safetensors`) and, for a pruner, the one-shot model (`pruned/`). `resume` loads them and
  continues at the next unfinished block: the stream into it is recomputed from the saved blocks, so the
  result is bit-identical (on CPU) to an uninterrupted run.
* OUT is written atomically at the end like `prune`'s output: a model directory `from_pretrained` loads,
  `semisparse.json` (method reconstruct, `pattern`, the config, calibration provenance, per-block losses,
  seconds, peak memory), `metrics.jsonl` (one line per block) and `masks.npz` (the masks, usable as
  MaskLLM's `prior_mask`). The work directory is removed then.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from semisparse import registry
from semisparse.calibration import load_calibration
from semisparse.data import file_sha256
from semisparse.errors import SemisparseError
from semisparse.export import (
    METADATA_FILE,
    ensure_output_available,
    provenance,
    read_metadata,
    save_model_dir,
    usual_mode,
    writes_output,
)
from semisparse.jobs.base import Stage, StageConfig
from semisparse.jobs.reconstruct_inputs import check_fits, pruned_kind, resolve_pattern
from semisparse.maskfiles import (
    MASKS_FILE,
    apply_masks,
    load_masks,
    masks_from_model,
    save_masks,
    target_shapes,
)
from semisparse.models import load_model, load_tokenizer, model_provenance
from semisparse.modules import find_targets, layer_filter
from semisparse.nm import NMPattern
from semisparse.pruning import prune, pruner_config
from semisparse.reconstruction.config import ReconstructConfig
from semisparse.reconstruction.core import Reconstructor, lr_hint
from semisparse.report import sparsity_report
from semisparse.runtime import default_device, measured

WORK_SUFFIX = ".partial"
STATE_FILE = "state.json"
METRICS_FILE = "metrics.jsonl"
PRUNED_DIR = "pruned"
STATE_FORMAT = 1

BlockHook = Callable[[int, dict[str, Any]], None]


def work_dir(out: str | Path) -> Path:
    """Where an unfinished run into `out` keeps its finished blocks: `OUT.partial` beside it."""
    out = Path(out).expanduser()
    return out.with_name(out.name + WORK_SUFFIX)


def _write_atomic(path: Path, data: bytes) -> None:
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
        os.chmod(tmp, usual_mode(directory=False))  # mkstemp makes it private
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _metrics_lines(blocks: list[dict[str, Any]]) -> str:
    return "".join(json.dumps(block) + "\n" for block in blocks)


def _load_state(work: Path) -> dict[str, Any] | None:
    path = work / STATE_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        raise SemisparseError(
            f"{path} is not valid JSON: the interrupted run cannot be continued, pass `overwrite`"
        ) from None


def _check_resumable(state: dict[str, Any], identity: dict[str, Any], work: Path) -> None:
    if state.get("format") != STATE_FORMAT or state.get("identity") != identity:
        old, new = state.get("identity") or {}, identity
        changed = sorted(key for key in {*old, *new} if old.get(key) != new.get(key))
        shown = ", ".join(f"{key}: {old.get(key)!r} -> {new.get(key)!r}" for key in changed[:3])
        raise SemisparseError(
            f"the interrupted run in {work} had other inputs or settings ({shown}): "
            "restore them, or pass `overwrite` to start over"
        )


@writes_output(refuse_existing=False)
def reconstruct_to_dir(
    model_name: str,
    pruned: str,
    out: str | Path,
    config: ReconstructConfig,
    *,
    overwrite: bool = False,
    resume: bool = False,
    progress: bool = True,
    after_block: BlockHook | None = None,
) -> dict[str, Any]:
    """Reconstruct PRUNED against MODEL into `out` (see the module doc); returns the `semisparse.json`.

    `after_block(index, report)` runs once a block is saved in the work directory (tests interrupt there).
    """
    out = Path(out).expanduser()
    work = work_dir(out)
    finished = read_metadata(out) if (out / METADATA_FILE).is_file() else None
    finished = finished if finished is not None and finished.get("method") == "reconstruct" else None
    if resume and finished is not None and not work.exists():
        return finished  # done before; the caller had not recorded it yet
    state = _load_state(work)
    if state is not None and not resume and not overwrite:
        raise SemisparseError(
            f"{work} holds an interrupted run into {out}: pass `resume` to continue it, "
            "or `overwrite` to start over"
        )
    ensure_output_available(out, overwrite or (resume and finished is not None))
    kind = pruned_kind(pruned)
    pattern, include, exclude = resolve_pattern(config, kind, pruned)
    device = config.device or default_device()
    filter_fn = layer_filter(include, exclude)

    dense = load_model(model_name)
    tokenizer = load_tokenizer(model_name)
    targets = list(find_targets(dense, filter_fn, m=pattern.m))
    calibration = config.calibration()
    ids, calibration_info = load_calibration(dense, tokenizer, calibration)
    start: dict[str, Any] = {"kind": kind}
    sparse: nn.Module | None = None
    if kind == "model":
        sparse = load_model(pruned)
        check_fits(dense, sparse, targets, pruned, model_name, pattern)
        meta = read_metadata(pruned) or {}
        start.update(path=str(Path(pruned).expanduser().resolve()), method=meta.get("method"))
    elif kind == "masks":
        path = Path(pruned).expanduser()
        sparse = load_model(model_name)
        masks = load_masks(path, target_shapes(sparse, pattern, include, exclude))
        apply_masks(sparse, masks, pattern, include, exclude, source=f"mask file {path}")
        start.update(path=str(path.resolve()), sha256=file_sha256(path), method="mask-file")
    else:
        pruner = pruner_config(pruned, pattern=str(pattern))  # validated before anything is written
        start.update(method=pruned, settings=pruner.to_dict())
    # The constructor checks that the granularity can split every block, before anything is written.
    Reconstructor(dense, sparse if sparse is not None else dense, config, pattern, targets, progress=False)

    identity = {
        "model": model_name,
        "pruned": pruned,
        "pattern": str(pattern),
        "include": include,
        "exclude": exclude,
        "config": config.identity(),
    }
    if state is not None and resume:
        _check_resumable(state, identity, work)
    else:
        if work.exists():
            shutil.rmtree(work)
        state = {"format": STATE_FORMAT, "identity": identity, "blocks": [], "seconds": 0.0}
    work.mkdir(parents=True, exist_ok=True)
    _write_atomic(work / STATE_FILE, json.dumps(state, indent=1).encode())

    with measured(device) as cost:
        if kind == "pruner":
            sparse, start = _one_shot(
                model_name, pruned, pattern, filter_fn, ids, calibration_info, work, device, progress, start
            )
        assert sparse is not None
        done = [report["block"] for report in state["blocks"]]
        for index in done:
            _load_block(sparse, work / _block_file(index))

        def save_block(index: int, block: nn.Module, report: dict[str, Any]) -> None:
            prefix = next(name for name, module in sparse.named_modules() if module is block)
            tensors = {
                f"{prefix}.{name}": param.detach().to("cpu").contiguous()
                for name, param in block.named_parameters()
                if any(name.startswith(layer + ".") for layer in runner.layers[index])
            }
            tmp = work / f".{_block_file(index)}.tmp"
            save_file(tensors, str(tmp))
            tmp.chmod(usual_mode(directory=False))  # safetensors writes it private
            os.replace(tmp, work / _block_file(index))
            state["blocks"].append(report)
            state["seconds"] = round(state["seconds"] + report["seconds"], 3)
            _write_atomic(work / STATE_FILE, json.dumps(state, indent=1).encode())
            _write_atomic(work / METRICS_FILE, _metrics_lines(state["blocks"]).encode())
            if after_block is not None:
                after_block(index, report)

        runner = Reconstructor(dense, sparse, config, pattern, targets, device, progress)
        next_block = max(done) + 1 if done else 0
        began = time.perf_counter()
        runner.run(ids, next_block, save_block)
        this_run = time.perf_counter() - began

    report = sparsity_report(sparse, pattern, include, exclude)
    if report.violations:
        raise SemisparseError(f"internal error: {report.violations[0]} does not follow {pattern}")
    blocks = state["blocks"]
    per_layer = {layer.name: layer.sparsity for layer in report.layers}
    metadata = provenance(
        **model_provenance(model_name),
        method="reconstruct",
        pattern=str(pattern),
        sparsity=None,
        targets=targets,
        include=include,
        exclude=exclude,
        overall_sparsity=report.overall_sparsity,
        per_layer_sparsity=per_layer,
        start=start,
        calibration=calibration_info,
        settings={**config.to_dict(), "device": device},
        seed=config.seed,
        blocks=blocks,
        block_loss_before=_mean(blocks, "block_loss_before"),
        block_loss_after=_mean(blocks, "block_loss_after"),
        mask_changed=_mean(blocks, "mask_changed") if config.learn_mask else None,
        reconstruct_seconds=round(state["seconds"], 2),
        run_seconds=round(this_run, 2),
        resumed_at_block=next_block if next_block else None,
        peak_memory_bytes=cost.peak_memory_bytes,
    )
    masks = masks_from_model(sparse, pattern, include, exclude)

    def extra(tmp: Path) -> None:
        (tmp / METRICS_FILE).write_text(_metrics_lines(blocks))
        save_masks(masks, tmp / MASKS_FILE)

    save_model_dir(sparse, tokenizer, out, metadata, overwrite=True, extra=extra)
    shutil.rmtree(work, ignore_errors=True)
    return metadata


def _block_file(index: int) -> str:
    return f"block-{index:04d}.safetensors"


def _load_block(model: nn.Module, path: Path) -> None:
    if not path.is_file():
        raise SemisparseError(f"{path} is missing: the interrupted run cannot be continued, pass `overwrite`")
    with torch.no_grad():
        for name, tensor in load_file(str(path)).items():
            model.get_parameter(name).copy_(tensor)


def _mean(blocks: list[dict[str, Any]], key: str) -> float | None:
    values = [block[key] for block in blocks if block.get(key) is not None]
    return sum(values) / len(values) if values else None


def _one_shot(
    model_name: str,
    method: str,
    pattern: NMPattern,
    filter_fn: Any,
    ids: torch.Tensor,
    calibration_info: dict[str, Any] | None,
    work: Path,
    device: str,
    progress: bool,
    start: dict[str, Any],
) -> tuple[nn.Module, dict[str, Any]]:
    """MODEL pruned by `method` on the reconstruction's own windows, kept in the work directory so that a
    resumed run starts from the very same model."""
    folder = work / PRUNED_DIR
    if (folder / METADATA_FILE).is_file():
        meta = read_metadata(folder) or {}
        return load_model(str(folder)), {**start, "prune_seconds": meta.get("prune_seconds")}
    model = load_model(model_name)
    config = pruner_config(method, pattern=str(pattern))
    entry = registry.lookup("pruner", method)
    began = time.perf_counter()
    prune(model, config, filter_fn, ids if entry.needs_calibration else None, device, progress)
    seconds = round(time.perf_counter() - began, 2)
    meta = provenance(
        base_model=model_name,
        method=method,
        pattern=str(pattern),
        prune_seconds=seconds,
        calibration=calibration_info if entry.needs_calibration else None,
    )
    save_model_dir(model, None, folder, meta, overwrite=True)
    return model, {**start, "prune_seconds": seconds}


@dataclass
class ReconstructStageConfig(ReconstructConfig, StageConfig):
    """`ReconstructConfig` as a recipe stage's config (the technique package stays below `jobs`)."""


# Registered by `semisparse.jobs.stages`, after the pipeline's original stages, so the stage list keeps its
# order whichever module is imported first.
SUMMARY = "Block-wise reconstruction of a pruned model's kept weights (and masks) against the dense model."


class ReconstructStage(Stage):
    """`reconstruct_to_dir`. Without `pruned`, the previous stage's model is the sparse start and the
    recipe's base model the dense one; with `pruned`, the stage's input model is the dense one."""

    @classmethod
    def run(
        cls,
        config: ReconstructStageConfig,
        input_model: str,
        out: Path,
        base_model: str,
        *,
        overwrite: bool = False,
        resume: bool = False,
        progress: bool = True,
    ) -> dict[str, Any]:
        if config.pruned is None:
            if input_model == base_model:
                raise SemisparseError(
                    "the reconstruct stage needs a pruned model: put it after a prune stage, or set "
                    "`pruned` to a pruner, a pruned model directory or a mask file"
                )
            dense, pruned = base_model, input_model
        else:
            dense, pruned = input_model, config.pruned
        return reconstruct_to_dir(
            dense, pruned, out, config, overwrite=overwrite, resume=resume, progress=progress
        )

    @classmethod
    def summary(cls, metadata: dict[str, Any]) -> str:
        settings = metadata.get("settings") or {}
        before, after = metadata.get("block_loss_before") or 0, metadata.get("block_loss_after") or 0
        start = (metadata.get("start") or {}).get("method")
        text = f"{settings.get('granularity')} from {start}, block output loss {before:.4g} -> {after:.4g}"
        if metadata.get("mask_changed") is not None:
            text += f", mask changed {metadata['mask_changed']:.2%}"
        hint = run_hint(metadata)
        return f"{text} ({hint})" if hint else text


def run_hint(metadata: dict[str, Any]) -> str | None:
    """`lr_hint` for a finished run, from its semisparse.json (the command and `semisparse run` say it)."""
    settings = metadata.get("settings") or {}
    return lr_hint(metadata.get("blocks") or [], settings.get("lr", 0.0), bool(settings.get("learn_mask")))
