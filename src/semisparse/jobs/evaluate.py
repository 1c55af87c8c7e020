"""The eval job (`semisparse eval`): perplexity and zero-shot accuracy of several models, and their report.

Each model is loaded once and scored on the same text and the same harness tasks (built once, so every
model sees identical rows); the report names the data, seed and example counts that make runs comparable.
"""

from __future__ import annotations

from collections.abc import Sequence
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import torch

from semisparse.data import WIKITEXT2, data_dir, evaluation_text, file_sha256, mirror_file, window_bos
from semisparse.errors import SemisparseError
from semisparse.evaluation.comparison import build_report, training_curve, write_report
from semisparse.evaluation.perplexity import perplexity, tokenize_text
from semisparse.evaluation.zeroshot import DEFAULT_SEED, evaluate_zeroshot, load_tasks, parse_tasks
from semisparse.export import ensure_output_available, read_metadata, writes_output
from semisparse.models import load_model, load_tokenizer
from semisparse.runtime import default_device, measured, parse_dtype


def _perplexity_text(dataset: str) -> tuple[str, dict[str, Any]]:
    """The perplexity text and its source; for WikiText-2 also the mirror file and its sha256."""
    text, source = evaluation_text(dataset)
    local = mirror_file(*WIKITEXT2) if dataset == "wikitext2" else None
    if local is not None:
        root = data_dir()
        source["file"] = local.relative_to(root).as_posix() if root is not None else str(local)
        source["sha256"] = file_sha256(local)
    return text, source


@writes_output("report_dir")
def evaluate_models(
    model_names: Sequence[str],
    ppl: str | None = "wikitext2",
    tasks: str | Sequence[str] | None = None,
    limit: int | None = None,
    batch_size: int = 1,
    seqlen: int | None = None,
    max_windows: int | None = None,
    seed: int = DEFAULT_SEED,
    device: str | None = None,
    dtype: str = "float32",
    report_dir: str | Path | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Evaluate every model and return the comparison report (also written to `report_dir` if given).

    `ppl` is "wikitext2", a text file, or None/"none" to skip perplexity; `tasks` is "all" (the nine tasks
    of the 2:4 papers), a comma list or a list of any lm-evaluation-harness task names. Data problems surface
    before any model is loaded.
    """
    if not model_names:
        raise SemisparseError("no model given: pass one or more model names or directories")
    ppl = None if ppl in (None, "none") else ppl
    task_names = parse_tasks(tasks)
    if ppl is None and not task_names:
        raise SemisparseError("nothing to evaluate: give `ppl`=wikitext2 (or a text file) and/or `tasks`")
    if report_dir is not None:
        ensure_output_available(report_dir, overwrite, name="report_dir")
    device = device or default_device()
    text, source = _perplexity_text(ppl) if ppl is not None else (None, None)
    harness_tasks = load_tasks(task_names, progress) if task_names else None

    models = []
    for name in model_names:
        model = load_model(name, dtype=parse_dtype(dtype), device=device)
        tokenizer = load_tokenizer(name)
        entry: dict[str, Any] = {"model": name}
        if text is not None:
            entry["perplexity"] = perplexity_row(
                name, model, tokenizer, text, source, seqlen, max_windows, batch_size, device, progress
            )
        if harness_tasks is not None:
            with measured(device) as cost:
                scores = evaluate_zeroshot(model, tokenizer, harness_tasks, limit, batch_size, seed, progress)
            entry["zeroshot"] = {score.task: score.to_dict() for score in scores}
            entry["zeroshot_seconds"] = round(cost.seconds, 2)
        is_dir = Path(name).expanduser().is_dir()
        entry["provenance"] = read_metadata(name) if is_dir else None
        entry["training_curve"] = training_curve(name) if is_dir else []
        models.append(entry)
        del model

    settings = {
        "tasks": task_names,
        "limit": limit,
        "seed": seed,
        "num_fewshot": 0,
        "batch_size": batch_size,
        "perplexity_dataset": ppl,
        "device": device,
        "dtype": dtype,
        "lm_eval_version": _version("lm_eval"),
    }
    report = build_report(models, settings)
    if report_dir is not None:
        write_report(report, report_dir, overwrite)
    return report


def _version(package: str) -> str:
    try:
        return importlib_metadata.version(package)
    except importlib_metadata.PackageNotFoundError:
        return "unknown"


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
        result = perplexity(
            model, ids, seqlen, max_windows, batch_size, progress, bos_token_id=window_bos(tokenizer)
        )
    meta = read_metadata(name) if Path(name).expanduser().is_dir() else None
    return {
        "model": name,
        "method": (meta or {}).get("method", "dense"),
        "pattern": (meta or {}).get("pattern"),
        "perplexity": result.perplexity,
        "windows": result.n_windows,
        "total_windows": result.total_windows,
        "seqlen": result.seqlen,
        "bos": result.bos,
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
