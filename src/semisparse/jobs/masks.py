"""The mask-file jobs behind `semisparse apply-mask` and `semisparse export-mask`.

A mask file is portable: `export-mask` reads the masks off any N:M-sparse model (so a mask learned once
can seed `--prior-mask` elsewhere), and `apply-mask` puts a mask file on a dense model, refusing anything
that does not fit it exactly: exactly N of every M kept, unless `at_most` allows fewer.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from semisparse import nm
from semisparse.data import file_sha256
from semisparse.errors import SemisparseError
from semisparse.export import (
    ensure_output_available,
    provenance,
    read_metadata,
    save_model_dir,
    writes_output,
)
from semisparse.maskfiles import (
    MASKS_FILE,
    apply_masks,
    load_masks,
    masks_from_model,
    save_masks,
    target_shapes,
)
from semisparse.models import load_model, load_tokenizer, model_provenance
from semisparse.report import sparsity_report
from semisparse.runtime import parse_dtype


@writes_output()
def apply_mask_to_dir(
    model_name: str,
    masks_path: str | Path,
    out: str | Path,
    pattern: str = "2:4",
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    dtype: str = "float32",
    overwrite: bool = False,
    at_most: bool = False,
) -> dict[str, Any]:
    """Apply a mask file to a dense model and save the sparse model (with a copy of the masks) to `out`.

    Every mask must keep exactly N of every M weights; `at_most` accepts N or fewer (recorded).
    """
    ensure_output_available(out, overwrite)
    parsed = nm.parse_pattern(pattern)
    masks_path = Path(masks_path).expanduser()
    if not masks_path.is_file():
        raise SemisparseError(f"mask file {masks_path} does not exist: check the path")
    model = load_model(model_name, dtype=parse_dtype(dtype))
    tokenizer = load_tokenizer(model_name)
    masks = load_masks(masks_path, target_shapes(model, parsed, include, exclude))
    source = f"mask file {masks_path}"
    per_layer = apply_masks(model, masks, parsed, include, exclude, source=source, at_most=at_most)
    report = sparsity_report(model, parsed, include, exclude)
    metadata = provenance(
        **model_provenance(model_name),
        method="mask-file",
        pattern=str(parsed),
        sparsity=None,
        targets=list(per_layer),
        include=list(include),
        exclude=list(exclude),
        overall_sparsity=report.overall_sparsity,
        per_layer_sparsity=per_layer,
        masks_file=str(masks_path.resolve()),
        masks_sha256=file_sha256(masks_path),
        settings={"dtype": dtype, "at_most": at_most},
    )
    save_model_dir(
        model,
        tokenizer,
        out,
        metadata,
        overwrite=overwrite,
        extra=lambda tmp: shutil.copyfile(masks_path, tmp / MASKS_FILE),
    )
    return metadata


@writes_output(refuse_existing=False)
def export_mask_file(
    model_name: str,
    out: str | Path,
    pattern: str | None = None,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write the masks of an N:M-sparse model (read from its zeros) as a mask file.

    The pattern and layer selection default to those the model was saved with (`semisparse.json`).
    """
    path = Path(out).expanduser()
    if path.is_dir():
        raise SemisparseError(f"{path} is a directory: pass a file name such as masks.npz as `out`")
    if path.exists() and not overwrite:
        raise SemisparseError(f"{path} already exists: choose another `out` or pass `overwrite`")
    meta = (read_metadata(model_name) if Path(model_name).expanduser().is_dir() else None) or {}
    parsed = nm.parse_pattern(pattern or meta.get("pattern") or "2:4")
    include = list(meta.get("include", ()) if include is None else include)
    exclude = list(meta.get("exclude", ()) if exclude is None else exclude)
    model = load_model(model_name)
    masks = masks_from_model(model, parsed, include, exclude)
    if path.exists() and not overwrite:  # made meanwhile by something that does not take our lock
        raise SemisparseError(
            f"{path} appeared while this run worked: choose another `out` or pass `overwrite`"
        )
    save_masks(masks, path)
    return {
        "path": str(path),
        "pattern": str(parsed),
        "layers": len(masks),
        "kept_fraction": sum(int(m.sum()) for m in masks.values()) / sum(m.numel() for m in masks.values()),
        "sha256": file_sha256(path),
    }
