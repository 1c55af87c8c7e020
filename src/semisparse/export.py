"""Writing model directories that plain `transformers` loads, with semisparse's provenance beside them.

Outputs are written to a hidden temporary sibling directory and renamed into place only when complete, so
an interrupted or failed run never leaves a half-written output behind.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import torch

from semisparse.errors import SemisparseError

METADATA_FILE = "semisparse.json"


def ensure_output_available(out: str | Path, overwrite: bool, name: str = "out") -> Path:
    """Fail before any work is done if `out` exists and the user did not ask to overwrite it.

    `name` is the caller's parameter that holds `out`, named in the message (the CLI shows its flag).
    """
    path = Path(out).expanduser()
    if path.exists() and not overwrite:
        raise SemisparseError(
            f"output directory {path} already exists: choose another `{name}` or pass `overwrite`"
        )
    if path.exists() and not path.is_dir():
        raise SemisparseError(f"output path {path} exists and is not a directory: choose another `{name}`")
    return path


@contextmanager
def atomic_directory(out: str | Path, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary directory that replaces `out` only if the block finishes without error."""
    final = ensure_output_available(out, overwrite)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; the output should get the usual permissions
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        trash = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
        os.replace(final, trash / final.name)
        os.replace(tmp, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, final)


def versions() -> dict[str, str]:
    """Versions that decide whether a result can be reproduced."""
    found = {"python": platform.python_version(), "torch": torch.__version__}
    for package in ("semisparse", "transformers"):
        try:
            found[package] = importlib_metadata.version(package)
        except importlib_metadata.PackageNotFoundError:
            found[package] = "unknown"
    return found


def provenance(**fields: Any) -> dict[str, Any]:
    """The common header of every `semisparse.json`: versions, command line and time, plus `fields`."""
    return {
        "semisparse_format": 1,
        **fields,
        "versions": versions(),
        "command": sys.argv,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def save_model_dir(
    model: torch.nn.Module,
    tokenizer: Any | None,
    out: str | Path,
    metadata: dict[str, Any],
    overwrite: bool = False,
    extra: Callable[[Path], None] | None = None,
) -> Path:
    """Save `model` (safetensors), its tokenizer and `semisparse.json` atomically into `out`.

    `extra`, if given, writes additional files into the temporary directory before it is renamed.
    """
    with atomic_directory(out, overwrite) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / METADATA_FILE).write_text(json.dumps(metadata, indent=2, sort_keys=False) + "\n")
        if extra is not None:
            extra(tmp)
    return Path(out).expanduser()


def read_metadata(model_dir: str | Path) -> dict[str, Any] | None:
    """The `semisparse.json` of a model directory, or None for a model semisparse did not write."""
    path = Path(model_dir).expanduser() / METADATA_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise SemisparseError(f"{path} is not valid JSON ({exc.msg}): re-export the model") from exc
