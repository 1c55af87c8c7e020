"""Atomic, verifiable training checkpoints and the random-number state that makes resuming exact.

A checkpoint is a directory `checkpoints/step-00000100/` holding `state.pt` (model, optimizer, scheduler,
method state, RNG states, data position) and `checkpoint.json` (step, sha256 of `state.pt`, the config's
fingerprint fields). It is written into a hidden temporary directory and renamed into place, so a
directory with a final name is always complete; the sha256 catches later corruption. `state.pt` is read
with `weights_only=True`: method state must be tensors, numbers, strings and containers of them.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from semisparse.data import file_sha256
from semisparse.errors import SemisparseError

FORMAT = 1
STATE_FILE = "state.pt"
META_FILE = "checkpoint.json"
PREFIX = "step-"


def checkpoints_dir(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run, oldest first (temporary directories start with a dot)."""
    found = []
    folder = checkpoints_dir(run_dir)
    for path in folder.glob(f"{PREFIX}*") if folder.is_dir() else []:
        suffix = path.name[len(PREFIX) :]
        if suffix.isdigit() and (path / META_FILE).is_file():
            found.append((int(suffix), path))
    return sorted(found)


def save_checkpoint(run_dir: Path, step: int, state: dict[str, Any], meta: dict[str, Any], keep: int) -> Path:
    """Write checkpoint `step` atomically, then delete all but the newest `keep` checkpoints."""
    folder = checkpoints_dir(run_dir)
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"{PREFIX}{step:08d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=folder))
    try:
        torch.save(state, tmp / STATE_FILE)
        record = {"format": FORMAT, "step": step, "sha256": file_sha256(tmp / STATE_FILE), **meta}
        (tmp / META_FILE).write_text(json.dumps(record, indent=2, default=str) + "\n")
        if final.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=folder))
            os.replace(final, trash / final.name)
            os.replace(tmp, final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for _, old in list_checkpoints(run_dir)[:-keep]:
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def resolve_resume(resume: str | Path, run_dir: Path) -> Path:
    """A checkpoint directory from `--resume`: `latest` (of this run), a run directory, or a checkpoint."""
    if str(resume) == "latest":
        found = list_checkpoints(run_dir)
        if not found:
            raise SemisparseError(f"{run_dir} has no checkpoint to resume from; start without --resume")
        return found[-1][1]
    path = Path(resume).expanduser()
    if (path / META_FILE).is_file():
        return path
    if checkpoints_dir(path).is_dir():
        found = list_checkpoints(path)
        if found:
            return found[-1][1]
    raise SemisparseError(f"{resume} is neither a checkpoint nor a run directory with one; check --resume")


def read_meta(path: Path) -> dict[str, Any]:
    try:
        meta = json.loads((path / META_FILE).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise SemisparseError(
            f"checkpoint {path} is unreadable ({type(err).__name__}); resume from another one or start over"
        ) from err
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise SemisparseError(f"checkpoint {path} has an unknown format; resume from another or start over")
    return meta


def check_compatible(path: Path, meta: dict[str, Any], expected: dict[str, Any]) -> None:
    """Refuse a checkpoint of another run: every field it recorded (config fields that decide the result,
    method, world size) must equal the current run's."""
    recorded = meta.get("fields", {})
    keys = sorted(set(recorded) | set(expected))
    differing = [k for k in keys if _normalise(recorded.get(k)) != _normalise(expected.get(k))]
    if differing:
        detail = ", ".join(
            f"{k}: {_short(recorded.get(k))} vs {_short(expected.get(k))}" for k in differing[:3]
        )
        raise SemisparseError(
            f"checkpoint {path} belongs to a different run ({detail}); resume with the same settings "
            "or start over with --overwrite"
        )


def _normalise(value: Any) -> Any:
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


def load_state(path: Path, meta: dict[str, Any]) -> dict[str, Any]:
    """`state.pt` after checking its sha256 against the record written with it."""
    state_file = path / STATE_FILE
    if not state_file.is_file() or file_sha256(state_file) != meta.get("sha256"):
        raise SemisparseError(
            f"checkpoint {path} is corrupt ({STATE_FILE} missing or its sha256 differs); "
            "resume from an earlier checkpoint or start over with --overwrite"
        )
    try:
        return torch.load(state_file, map_location="cpu", weights_only=True)
    except Exception as err:
        raise SemisparseError(
            f"checkpoint {path} cannot be read ({type(err).__name__}); resume from an earlier checkpoint"
        ) from err


def rng_state() -> dict[str, Any]:
    """Every generator a step may draw from: Python, NumPy's global, torch CPU and all CUDA devices."""
    kind, keys, position, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "position": int(position),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    saved = state["numpy"]
    keys = saved["keys"].numpy().astype(np.uint32)
    np.random.set_state((saved["kind"], keys, saved["position"], saved["has_gauss"], saved["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
