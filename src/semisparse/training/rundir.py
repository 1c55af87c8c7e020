"""A training run's output directory: checked before any input is loaded, set up before training starts.

Layout (`config.output`, OUT):

    OUT/config.yaml           the validated TrainConfig (method settings under `method`)
    OUT/metrics.jsonl         one JSON row per optimizer step and per evaluation
    OUT/checkpoints/step-N/   the newest resumable checkpoints
    OUT/tensorboard/          with `tensorboard`
    OUT/model/                the final model (plain transformers layout) with semisparse.json

`overwrite` builds the new run in a hidden sibling `.OUT.overwrite-*` and swaps it for the old run only at
the new run's first checkpoint (periodic, on a signal, or the final one), so a run that fails before then
leaves the old run as it was. An output directory that is or contains the input model is refused.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

from semisparse.errors import SemisparseError
from semisparse.export import METADATA_FILE, check_writable
from semisparse.training import checkpoint, distributed
from semisparse.training.config import TrainConfig

CONFIG_FILE = "config.yaml"
MODEL_DIR = "model"
# Hidden siblings of OUT: a run being built by `overwrite`, and an old run being swapped out.
_STAGING = ".overwrite-"
_RETIRED = ".old-"


def check_output(config: TrainConfig, resume: str | Path | None, overwrite: bool) -> Path:
    """Refuse an output the run may not write to; returns the checkpoint to resume (`resume`) or OUT."""
    out = Path(config.output).expanduser()
    target = out.resolve()
    model = Path(config.model).expanduser()
    if model.exists() and _inside(model.resolve(), target):
        raise SemisparseError(
            f"the output directory {out} is or contains the input model {config.model}: training would "
            "replace it; choose another `output`"
        )
    if overwrite and resume is None:
        for name in ("corpus", "eval_corpus"):
            path = Path(getattr(config, name)).expanduser()
            if path.is_file() and _inside(path.resolve(), target):
                raise SemisparseError(
                    f"`{name}` {path} lies in {out}, which `overwrite` replaces; move it or choose another "
                    "`output`"
                )
    if resume is not None:
        if (out / MODEL_DIR).exists():
            raise SemisparseError(f"the run in {out} already finished ({out / MODEL_DIR}); nothing to resume")
        return checkpoint.resolve_resume(resume, out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not overwrite:
            raise SemisparseError(
                f"output directory {out} already exists: choose another `output`, `resume` to continue it "
                "or `overwrite` to start over"
            )
        if not (out / CONFIG_FILE).is_file() and not (out / METADATA_FILE).is_file():
            raise SemisparseError(
                f"{out} is not a semisparse run directory; not overwriting it, choose another `output`"
            )
    check_writable(out, "output")  # before the model and corpus load, not after
    return out


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


class RunDirectory:
    """Where a run writes: `path` is OUT, or on the main rank of an `overwrite` run the hidden sibling
    `staging` until `promote` swaps it in for the old run (or `discard` removes it)."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.path = out
        self.staging: Path | None = None

    def prepare(self, config: TrainConfig, info: distributed.Distributed, resuming: bool) -> None:
        """Main rank: remove what killed processes left behind, then set up the directory to write into.

        A fresh run writes `config.yaml` now; a resumed one once its checkpoint has been accepted. A fresh
        run where a non-empty OUT exists (`overwrite`, checked) is built in a hidden sibling instead.
        """
        distributed.barrier(info)
        if info.is_main:
            self.clean_stale()
            try:
                if not resuming and self.out.is_dir() and any(self.out.iterdir()):
                    self.out.parent.mkdir(parents=True, exist_ok=True)
                    prefix = f".{self.out.name}{_STAGING}"
                    self.staging = Path(tempfile.mkdtemp(prefix=prefix, dir=self.out.parent))
                    umask = os.umask(0)
                    os.umask(umask)
                    self.staging.chmod(0o777 & ~umask)
                    self.path = self.staging
                self.path.mkdir(parents=True, exist_ok=True)
                if not resuming:
                    config.to_yaml(self.path / CONFIG_FILE)
            except OSError as err:
                raise SemisparseError(
                    f"cannot write the run directory {self.path} ({err.strerror or type(err).__name__}); "
                    "choose a writable `output`"
                ) from err
        distributed.barrier(info)

    def clean_stale(self) -> None:
        """Temporary directories of this run that a killed process left: unfinished checkpoints and exports
        inside OUT, and unfinished `overwrite` runs and swaps beside it."""
        out = self.out
        stale = checkpoint.clean_stale(out)
        patterns = [f".{out.name}{_STAGING}*", f".{out.name}{_RETIRED}*"]
        found = [p for pattern in patterns for p in out.parent.glob(pattern)] if out.parent.is_dir() else []
        if out.is_dir():
            found += [
                p for pattern in (f".{MODEL_DIR}.tmp-*", f".{MODEL_DIR}.old-*") for p in out.glob(pattern)
            ]
        for path in found:
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
                stale.append(path)
        if stale:
            print(
                f"semisparse: removed {len(stale)} unfinished temporary directories of {out}", file=sys.stderr
            )

    def promote(self) -> Path:
        """Main rank, at the first checkpoint of an `overwrite` run: the new run replaces the old one.
        Returns where the new run was, so paths into it can be moved to OUT."""
        staging, out = self.staging, self.out
        retired = None
        try:
            if out.exists():
                retired = Path(tempfile.mkdtemp(prefix=f".{out.name}{_RETIRED}", dir=out.parent))
                os.replace(out, retired / out.name)
            os.replace(staging, out)
            checkpoint.fsync_path(out.parent)
        except OSError as err:
            if retired is not None and (retired / out.name).exists() and not out.exists():
                os.replace(retired / out.name, out)  # put the old run back
            self.staging = None  # keep the new run's checkpoint where it is for the user to move
            raise SemisparseError(
                f"cannot replace the old run in {out} by the new one in {staging} "
                f"({err.strerror or type(err).__name__}); move it there by hand, then continue with `resume`"
            ) from err
        if retired is not None:
            shutil.rmtree(retired, ignore_errors=True)
        self.staging = None
        self.path = out
        return staging

    def discard(self) -> None:
        """Remove a staged run that never checkpointed: the old run in OUT stays as it was."""
        if self.staging is not None:
            shutil.rmtree(self.staging, ignore_errors=True)
            self.staging = None
            self.path = self.out
