"""End-to-end jobs behind the CLI commands: load, prune, evaluate, save.

Each function takes plain values (model names, paths, numbers), so the CLI stays a thin translation of
flags, and the same jobs can be scripted from Python.
"""

from __future__ import annotations

import resource
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from semisparse import nm
from semisparse.data import calibration_ids, file_sha256, read_texts, wikitext2_test_text
from semisparse.errors import SemisparseError
from semisparse.evaluation.perplexity import perplexity, tokenize_text
from semisparse.export import ensure_output_available, provenance, read_metadata, save_model_dir
from semisparse.models import context_length, load_model, load_tokenizer
from semisparse.pruning import PRUNING_METHODS, prune
from semisparse.report import SparsityReport, sparsity_report

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise SemisparseError(f"unknown dtype '{name}': use one of {', '.join(DTYPES)}")
    return DTYPES[name]


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass
class Measurement:
    seconds: float = 0.0
    peak_memory_bytes: dict[str, int] = field(default_factory=dict)


@contextmanager
def measured(device: str) -> Iterator[Measurement]:
    """Wall time and peak memory (process RSS; CUDA allocator peak on GPU) of the enclosed work."""
    result = Measurement()
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    yield result
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        result.peak_memory_bytes["cuda_allocated"] = torch.cuda.max_memory_allocated()
    result.seconds = time.perf_counter() - start
    result.peak_memory_bytes["process_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def prune_to_dir(
    model_name: str,
    out: str | Path,
    method: str = "sparsegpt",
    pattern: str | None = "2:4",
    sparsity: float | None = None,
    calibration: str = "c4",
    nsamples: int = 128,
    seqlen: int = 2048,
    seed: int = 0,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    blocksize: int = 128,
    percdamp: float = 0.01,
    device: str | None = None,
    dtype: str = "float32",
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Prune a model one-shot and save it with its provenance; returns the `semisparse.json` content."""
    ensure_output_available(out, overwrite)
    if method not in PRUNING_METHODS:
        raise SemisparseError(f"unknown method '{method}': use one of {', '.join(PRUNING_METHODS)}")
    if (pattern is None) == (sparsity is None):
        raise SemisparseError("give exactly one of --pattern (e.g. 2:4) and --sparsity (e.g. 0.5)")
    parsed = nm.parse_pattern(pattern) if pattern is not None else None
    device = device or default_device()
    model = load_model(model_name, dtype=parse_dtype(dtype), device=device)
    tokenizer = load_tokenizer(model_name)

    ids, calibration_info = None, None
    if method != "magnitude":
        context = context_length(model)
        if seqlen > context:
            raise SemisparseError(
                f"--seqlen {seqlen} exceeds the model's context of {context}: use a smaller --seqlen"
            )
        ids, calibration_info = calibration_ids(tokenizer, calibration, nsamples, seqlen, seed)

    with measured(device) as cost:
        per_layer = prune(
            model,
            method=method,
            pattern=parsed,
            sparsity=sparsity,
            calibration_ids=ids,
            include=include,
            exclude=exclude,
            blocksize=blocksize,
            percdamp=percdamp,
            device=device,
            progress=progress,
        )
    report = sparsity_report(model, parsed, include, exclude)
    if report.violations:
        raise SemisparseError(
            f"internal error: {report.violations[0]} does not follow {parsed} after pruning"
        )
    metadata = provenance(
        base_model=model_name,
        method=method,
        pattern=str(parsed) if parsed else None,
        sparsity=sparsity,
        targets=list(per_layer),
        include=list(include),
        exclude=list(exclude),
        overall_sparsity=report.overall_sparsity,
        per_layer_sparsity=per_layer,
        calibration=calibration_info,
        settings={"blocksize": blocksize, "percdamp": percdamp, "dtype": dtype, "device": device},
        seed=seed,
        prune_seconds=round(cost.seconds, 2),
        peak_memory_bytes=cost.peak_memory_bytes,
    )
    save_model_dir(model, tokenizer, out, metadata, overwrite=overwrite)
    return metadata


def inspect_model(model_name: str, pattern: str | None = None) -> SparsityReport:
    """Sparsity of a saved model's targets, verified against `pattern` or the one it was saved with."""
    meta = read_metadata(model_name) if Path(model_name).expanduser().is_dir() else None
    pattern = pattern or (meta or {}).get("pattern")
    model = load_model(model_name)
    include = (meta or {}).get("include", ())
    exclude = (meta or {}).get("exclude", ())
    return sparsity_report(model, nm.parse_pattern(pattern) if pattern else None, include, exclude)


def evaluation_text(dataset: str) -> tuple[str, dict[str, Any]]:
    """The text of a perplexity dataset (`wikitext2` or a local file) and where it came from."""
    if dataset == "wikitext2":
        return wikitext2_test_text(), {"dataset": "wikitext2", "split": "wikitext-2-raw-v1/test"}
    path = Path(dataset).expanduser()
    if not path.is_file():
        raise SemisparseError(
            f"perplexity dataset '{dataset}' is neither 'wikitext2' nor an existing text file"
        )
    return "\n\n".join(read_texts(path)), {"dataset": str(path), "sha256": file_sha256(path)}


def perplexity_row(
    name: str,
    model: torch.nn.Module,
    tokenizer: Any,
    text: str,
    source: dict[str, Any],
    seqlen: int | None = None,
    max_windows: int | None = None,
    batch_size: int = 1,
    device: str = "cpu",
    progress: bool = True,
) -> dict[str, Any]:
    """Perplexity of one loaded model on `text`, as one row of `evaluate_perplexity`."""
    ids = tokenize_text(tokenizer, text)
    with measured(device) as cost:
        result = perplexity(model, ids, seqlen, max_windows, batch_size, progress)
    meta = read_metadata(name) if Path(name).expanduser().is_dir() else None
    return {
        "model": name,
        "method": (meta or {}).get("method", "dense"),
        "pattern": (meta or {}).get("pattern"),
        "perplexity": result.perplexity,
        "windows": result.n_windows,
        "total_windows": result.total_windows,
        "seqlen": result.seqlen,
        "eval_seconds": round(cost.seconds, 2),
        **source,
    }


def evaluate_perplexity(
    model_names: Sequence[str],
    dataset: str = "wikitext2",
    seqlen: int | None = None,
    max_windows: int | None = None,
    batch_size: int = 1,
    device: str | None = None,
    dtype: str = "float32",
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Perplexity of each model on the same token stream; one row per model, in order."""
    device = device or default_device()
    text, source = evaluation_text(dataset)
    rows = []
    for name in model_names:
        model = load_model(name, dtype=parse_dtype(dtype), device=device)
        rows.append(
            perplexity_row(
                name,
                model,
                load_tokenizer(name),
                text,
                source,
                seqlen,
                max_windows,
                batch_size,
                device,
                progress,
            )
        )
        del model
    return rows
