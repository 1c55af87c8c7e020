"""Atomic, verifiable training checkpoints and the random-number state that makes resuming exact.

A checkpoint is a directory `checkpoints/step-00000100/` holding `state.pt` (model, optimizer, scheduler,
method state, RNG states, data position) and `checkpoint.json` (step, sha256 of `state.pt`, the config's
fingerprint fields, and the inputs it was trained on: the corpus's and the base model's sha256). It is
written into a hidden temporary directory, flushed to disk (fsync) and renamed into place, so a directory
with a final name is always complete and durable before older checkpoints are deleted; the sha256 catches
later corruption. `state.pt` is read with `weights_only=True`: method state must be tensors, numbers,
strings and containers of them. Temporary directories left by a killed process are removed by
`clean_stale` when the run starts or resumes.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from semisparse.data import file_sha256
from semisparse.errors import SemisparseError
from semisparse.export import usual_mode
from semisparse.models import cache_dir, resolve_model_path

FORMAT = 1
STATE_FILE = "state.pt"
META_FILE = "checkpoint.json"
PREFIX = "step-"
# What `state.pt` must hold for the loop to continue from it.
STATE_KEYS = ("model", "optimizer", "scheduler", "method", "step", "rng", "bad_steps", "skipped_steps")
# The files that decide a model's weights: hashed to pin the base model of a run.
_WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.gguf", "config.json")
_HASH_CACHE = "file-sha256.json"
_HASH_CACHE_ENTRIES = 512


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


def fsync_path(path: Path) -> None:
    """Flush a file's or a directory's entries to disk (a no-op where directories cannot be opened)."""
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except OSError:
        if path.is_dir():
            return
        raise
    try:
        os.fsync(descriptor)
    except OSError:
        if not path.is_dir():
            raise
    finally:
        os.close(descriptor)


def save_checkpoint(run_dir: Path, step: int, state: dict[str, Any], meta: dict[str, Any], keep: int) -> Path:
    """Write checkpoint `step` atomically and durably, then delete all but the newest `keep` checkpoints.

    The files and the temporary directory are fsynced before the rename, and the checkpoints directory
    after it, so an older checkpoint is only deleted once the new one is on disk.
    """
    folder = checkpoints_dir(run_dir)
    final = folder / f"{PREFIX}{step:08d}"
    tmp: Path | None = None
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=folder))
        tmp.chmod(usual_mode(directory=True))  # mkdtemp makes it private
        torch.save(state, tmp / STATE_FILE)
        record = {"format": FORMAT, "step": step, "sha256": file_sha256(tmp / STATE_FILE), **meta}
        (tmp / META_FILE).write_text(json.dumps(record, indent=2, default=str) + "\n")
        for path in (tmp / STATE_FILE, tmp / META_FILE, tmp):
            fsync_path(path)
        if final.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=folder))
            os.replace(final, trash / final.name)
            os.replace(tmp, final)
            fsync_path(folder)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, final)
            fsync_path(folder)
    except OSError as err:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        previous = [path for _, path in list_checkpoints(run_dir) if path != final]
        kept = f"the last checkpoint is {previous[-1]}" if previous else "no earlier checkpoint exists"
        reason = err.strerror or type(err).__name__
        raise SemisparseError(
            f"cannot write checkpoint {final} ({reason}); {kept}: make {folder} writable or free disk "
            "space, then continue with `resume`"
        ) from err
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    for _, old in list_checkpoints(run_dir)[:-keep]:
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def clean_stale(run_dir: Path) -> list[Path]:
    """Remove the temporary checkpoint directories a killed process left in `run_dir`; returns them."""
    folder = checkpoints_dir(run_dir)
    stale = [
        path
        for pattern in (f".{PREFIX}*.tmp-*", f".{PREFIX}*.old-*")
        for path in (folder.glob(pattern) if folder.is_dir() else [])
        if path.is_dir()
    ]
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return stale


def resolve_resume(resume: str | Path, run_dir: Path) -> Path:
    """A checkpoint directory from `resume`: `latest` (of this run), a run directory, or a checkpoint."""
    if str(resume) == "latest":
        found = list_checkpoints(run_dir)
        if not found:
            raise SemisparseError(f"{run_dir} has no checkpoint to resume from; start without `resume`")
        return found[-1][1]
    path = Path(resume).expanduser()
    if (path / META_FILE).is_file():
        return path
    if checkpoints_dir(path).is_dir():
        found = list_checkpoints(path)
        if found:
            return found[-1][1]
    raise SemisparseError(f"{resume} is neither a checkpoint nor a run directory with one; check `resume`")


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


def check_compatible(
    path: Path,
    meta: dict[str, Any],
    expected: dict[str, Any],
    schedule: frozenset[str] = frozenset(),
    allow_schedule_change: bool = False,
) -> dict[str, list[Any]]:
    """Refuse a checkpoint of another run: every field it recorded (config fields that decide the result,
    method, world size) must equal the current run's.

    `schedule` names the fields that only shape the learning-rate schedule or clipping from here on
    (`config.lr`, ...); with `allow_schedule_change` they may differ. Returns those that do, as
    {field: [recorded, current]}.
    """
    recorded = meta.get("fields", {})
    keys = sorted(set(recorded) | set(expected))
    differing = [k for k in keys if _normalise(recorded.get(k)) != _normalise(expected.get(k))]
    fixed = [k for k in differing if k not in schedule]
    if fixed:
        detail = describe_differences(recorded, expected, fixed)
        raise SemisparseError(
            f"checkpoint {path} belongs to a different run (checkpoint -> now: {detail}); resume with the "
            "same settings or start over with `overwrite`"
        )
    changes = {k: [recorded.get(k), expected.get(k)] for k in differing}
    if changes and not allow_schedule_change:
        detail = describe_differences(recorded, expected, differing)
        raise SemisparseError(
            f"checkpoint {path} was trained with another schedule (checkpoint -> now: {detail}); resume "
            "with the same settings, or add `allow_schedule_change` to continue with the new one"
        )
    return changes


def describe_differences(recorded: dict[str, Any], current: dict[str, Any], keys: list[str]) -> str:
    """How the fields `keys` differ, one `key: old -> new` each, for a one-line message.

    Mappings (the method's settings) are compared key by key, so each differing setting is named
    (`method.mask_update_every: 10 -> 0`); the `config.` prefix of the fingerprint fields is dropped. A
    value longer than `_SHOWN` characters is cut to a window around where the two values first differ; a
    field one side lacks is `(unset)`.
    """
    old, new = ({k: fields[k] for k in keys if k in fields} for fields in (recorded, current))
    rows = _differences(_normalise(old), _normalise(new), "")
    return ", ".join(f"{key}: {_shown(old, new)}" for key, old, new in rows)


_UNSET = object()
_SHOWN = 200


def _differences(old: Any, new: Any, prefix: str) -> list[tuple[str, Any, Any]]:
    if isinstance(old, dict) and isinstance(new, dict):
        rows = []
        for key in sorted(set(old) | set(new)):
            name = f"{prefix}{key}".removeprefix("config.")
            rows += _differences(old.get(key, _UNSET), new.get(key, _UNSET), f"{name}.")
        return rows
    return [] if old == new else [(prefix.removesuffix("."), old, new)]


def _shown(old: Any, new: Any) -> str:
    """`old -> new` as compact JSON; a value longer than `_SHOWN` characters is cut to a window that starts
    a little before the first character where the two texts differ, so the difference stays in view."""
    texts = ["(unset)" if value is _UNSET else json.dumps(value, sort_keys=True) for value in (old, new)]
    same = 0
    while same < min(map(len, texts)) and texts[0][same] == texts[1][same]:
        same += 1
    shown = []
    for text in texts:
        start = max(0, min(same - 40, len(text) - _SHOWN))
        end = start + _SHOWN
        if len(text) > _SHOWN:
            before, after = "..." if start else "", "..." if end < len(text) else ""
            text = f"{before}{text[start:end]}{after} ({len(text)} chars)"
        shown.append(text)
    return " -> ".join(shown)


def check_inputs(path: Path, meta: dict[str, Any], current: dict[str, Any]) -> None:
    """Refuse to resume on another corpus, tokenizer or base model than the checkpoint was trained on.

    `current` and the checkpoint's `inputs` record are {"corpus": {sha256, tokenizer_key, tokens},
    "model": {path, sha256}}. A checkpoint written before inputs were recorded is not checked.
    """
    recorded = meta.get("inputs")
    if not isinstance(recorded, dict):
        print(
            f"semisparse: checkpoint {path} does not record its corpus and model; not checking them",
            file=sys.stderr,
        )
        return
    corpus, now = recorded.get("corpus") or {}, current.get("corpus") or {}
    if corpus.get("sha256") != now.get("sha256"):
        raise SemisparseError(
            f"the corpus changed since checkpoint {path} (sha256 {_digest(corpus.get('sha256'))} then, "
            f"{_digest(now.get('sha256'))} now); restore the corpus it was trained on or start over with "
            "`overwrite`"
        )
    if corpus.get("tokenizer_key") != now.get("tokenizer_key") or corpus.get("tokens") != now.get("tokens"):
        raise SemisparseError(
            f"the corpus tokenises differently than when checkpoint {path} was written (tokenizer "
            f"{corpus.get('tokenizer_key')} then, {now.get('tokenizer_key')} now); restore the model's "
            "tokenizer or start over with `overwrite`"
        )
    model, now = recorded.get("model") or {}, current.get("model") or {}
    if model.get("sha256") != now.get("sha256"):
        raise SemisparseError(
            f"the base model's weights changed since checkpoint {path} ({now.get('path') or 'unresolved'}: "
            f"sha256 {_digest(model.get('sha256'))} then, {_digest(now.get('sha256'))} now); restore them "
            "or start over with `overwrite`"
        )


def _digest(value: Any) -> str:
    return f"{value[:12]}..." if isinstance(value, str) else "unknown"


def _normalise(value: Any) -> Any:
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def load_state(path: Path, meta: dict[str, Any]) -> dict[str, Any]:
    """`state.pt` after checking its sha256 against the record written with it."""
    state_file = path / STATE_FILE
    if not state_file.is_file() or file_sha256(state_file) != meta.get("sha256"):
        raise SemisparseError(
            f"checkpoint {path} is corrupt ({STATE_FILE} missing or its sha256 differs); "
            "resume from an earlier checkpoint or start over with `overwrite`"
        )
    try:
        state = torch.load(state_file, map_location="cpu", weights_only=True)
    except Exception as err:
        raise SemisparseError(
            f"checkpoint {path} cannot be read ({type(err).__name__}); resume from an earlier checkpoint"
        ) from err
    missing = [key for key in STATE_KEYS if not isinstance(state, dict) or key not in state]
    if missing:
        raise SemisparseError(
            f"checkpoint {path} is incomplete ({STATE_FILE} lacks {', '.join(missing)}); resume from "
            "another checkpoint or start over with `overwrite`"
        )
    return state


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


def model_identity(name_or_path: str) -> dict[str, Any]:
    """Where a model name resolves to and one sha256 over its weight files and `config.json`.

    A hub id that is no local path is looked up in the Hugging Face cache (it was just loaded from
    there); if it is not found, path and sha256 are None. File hashes are cached by path, size, inode and
    modification/change times, so pinning a large model costs one read per new file.
    """
    resolved = resolve_model_path(name_or_path)
    folder: Path | None = Path(resolved)
    if not folder.exists():
        folder = _hub_snapshot(resolved)
    if folder is None:
        return {"path": None, "sha256": None}
    if folder.is_dir():
        found = {file for pattern in _WEIGHT_PATTERNS for file in folder.glob(pattern)}
        files = sorted(file for file in found if file.is_file())
    else:
        files = [folder]
    digest = hashlib.sha256()
    for file in files:
        digest.update(f"{file.name}\0{cached_sha256(file)}\n".encode())
    return {"path": str(folder.resolve()), "sha256": digest.hexdigest()}


def _hub_snapshot(repo_id: str) -> Path | None:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:
        return None


def cached_sha256(file: Path) -> str:
    """`file_sha256`, remembered in the semisparse cache while the file's stat stays the same."""
    info = file.stat()
    key = f"{file.resolve()}|{info.st_size}|{info.st_ino}|{info.st_mtime_ns}|{info.st_ctime_ns}"
    store = cache_dir() / _HASH_CACHE
    try:
        known = json.loads(store.read_text())
        if not isinstance(known, dict):
            known = {}
    except (OSError, ValueError):
        known = {}
    if isinstance(known.get(key), str):
        return known[key]
    sha = file_sha256(file)
    known[key] = sha
    entries = dict(list(known.items())[-_HASH_CACHE_ENTRIES:])
    name = None
    try:
        store.parent.mkdir(parents=True, exist_ok=True)
        descriptor, name = tempfile.mkstemp(dir=store.parent, prefix=f".{store.name}.")
        with os.fdopen(descriptor, "w") as handle:
            json.dump(entries, handle)
        os.chmod(name, usual_mode(directory=False))  # mkstemp makes it private
        os.replace(name, store)
    except OSError:  # only a cache: the hash is still right
        if name is not None:
            Path(name).unlink(missing_ok=True)
    return sha
