"""Zero-shot accuracy through lm-evaluation-harness, with task data read from the local mirror.

The harness stays the authority on each task's prompt, answer choices and metrics; we only change where its
rows come from. A task whose evaluation split is in the mirror (`<data dir>/<dataset path>/<config>/<split>
.jsonl`, in the Hub's schema) is pointed at that file through the harness's own `json` dataset route, so the
run is offline and pinned by the file's sha256; any other task loads from the Hub as the harness always does.
The model is handed over as an object, so whatever modules it holds (sparse layers, SLoRB branches) run
exactly as they do everywhere else.
"""

from __future__ import annotations

import io
import logging
import random
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext, redirect_stderr
from dataclasses import asdict, dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from semisparse.data import data_dir, expected_location, file_sha256, mirror_file
from semisparse.errors import SemisparseError

# The tasks the 2:4 papers report, in their usual table order.
TASKS = (
    "boolq",
    "rte",
    "hellaswag",
    "winogrande",
    "arc_easy",
    "arc_challenge",
    "openbookqa",
    "piqa",
    "lambada_openai",
)
# Folders of lm_eval/tasks that define them: indexing only these takes milliseconds, the whole registry
# (~15k configs) about ten seconds.
_TASK_FOLDERS = {
    "boolq": "super_glue/boolq",
    "rte": "glue/rte",
    "hellaswag": "hellaswag",
    "winogrande": "winogrande",
    "arc_easy": "arc",
    "arc_challenge": "arc",
    "openbookqa": "openbookqa",
    "piqa": "piqa",
    "lambada_openai": "lambada",
}
# The harness's own default seed, so our numbers line up with plain `lm_eval` runs.
DEFAULT_SEED = 1234
# Stderr of means has a closed form; only lambada's perplexity is bootstrapped, and 100 draws suffice there.
_BOOTSTRAP_ITERS = 100
_REPORTED = ("acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "perplexity", "perplexity_stderr")


@dataclass
class TaskData:
    """Where a task's evaluation rows came from, so two runs can be checked to have used the same data."""

    task: str
    source: str  # "mirror" or "hub"
    dataset: str  # "<dataset path>" or "<dataset path>/<config>", as on the Hub
    split: str
    file: str | None  # path relative to the mirror
    sha256: str | None
    fingerprint: str | None  # the `datasets` fingerprint of a split loaded from the Hub
    n_total: int


@dataclass
class TaskScore:
    """The harness's metrics for one task (fractions; acc_norm only where the task defines it)."""

    task: str
    metrics: dict[str, float]
    n_examples: int
    data: TaskData

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ZeroShotTasks:
    """Harness tasks built once, with their data provenance, and reused for every model of a comparison."""

    tasks: dict[str, Any]
    data: dict[str, TaskData] = field(default_factory=dict)


def parse_tasks(spec: str | Sequence[str] | None) -> list[str]:
    """`"all"`, a comma-separated string or a list of task names -> validated names, in the given order."""
    if spec is None:
        return []
    names = spec.split(",") if isinstance(spec, str) else list(spec)
    names = [name.strip() for name in names if name.strip()]
    if names == ["all"]:
        return list(TASKS)
    unknown = [name for name in names if name not in TASKS]
    if unknown:
        raise SemisparseError(f"unknown task '{unknown[0]}': use 'all' or some of {','.join(TASKS)}")
    return list(dict.fromkeys(names))


@contextmanager
def _harness_warnings_muted() -> Iterator[None]:
    """Silence the harness's expected notices (a model passed as an object, default aggregations)."""
    logger = logging.getLogger("lm_eval")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


@cache
def _task_manager() -> Any:
    import lm_eval.tasks
    from lm_eval.tasks import TaskManager

    root = Path(lm_eval.tasks.__file__).parent
    folders = sorted({str(root / folder) for folder in _TASK_FOLDERS.values()})
    return TaskManager(include_defaults=False, include_path=folders)


def _eval_split(config: dict[str, Any]) -> str:
    """The split the harness scores: the test split when the task has one, else validation."""
    return config.get("test_split") or config["validation_split"]


def _mirror_override(name: str, config: dict[str, Any], local: Path) -> dict[str, Any]:
    """Overrides that make the harness read a task's evaluation split from one local JSONL file."""
    split = _eval_split(config)
    return {
        "task": name,
        "dataset_path": "json",
        "dataset_name": None,
        "dataset_kwargs": {"data_files": {split: str(local)}},
        # The file holds only the evaluated split, so no other split may be asked for (few-shot pools).
        "training_split": None,
        "validation_split": split if split == config.get("validation_split") else None,
        "test_split": split if split == config.get("test_split") else None,
        "fewshot_split": None,
    }


def _build_task(manager: Any, name: str) -> tuple[Any, TaskData]:
    entry = manager.task_index.get(name)
    if entry is None or not entry.cfg or "dataset_path" not in entry.cfg:
        raise SemisparseError(
            f"the installed lm-eval does not define task '{name}'; install a version in semisparse's range"
        )
    config = entry.cfg
    path, config_name, split = config["dataset_path"], config.get("dataset_name"), _eval_split(config)
    local = mirror_file(path, config_name, split)
    overrides = {"task": name} if local is None else _mirror_override(name, config, local)
    try:
        with _harness_warnings_muted():
            task = manager.load({"group": "semisparse", "task": [overrides]})["tasks"][name]
    except Exception as err:
        where = f"in {local} is unreadable" if local else "is neither in the data mirror nor on the Hub"
        raise SemisparseError(
            f"data of task '{name}' {where} ({type(err).__name__}); "
            f"put its {split} rows at {expected_location(path, config_name, split)}"
        ) from err
    dataset = "/".join(part for part in (path, config_name) if part)
    n_total = len(task.eval_docs)
    if local is None:
        fingerprint = getattr(task.dataset[split], "_fingerprint", None)
        return task, TaskData(name, "hub", dataset, split, None, None, fingerprint, n_total)
    root = data_dir()
    relative = local.relative_to(root).as_posix() if root is not None else str(local)
    return task, TaskData(name, "mirror", dataset, split, relative, file_sha256(local), None, n_total)


def mirrored_tasks(names: Sequence[str] = TASKS) -> list[str]:
    """The tasks among `names` whose evaluation split is in the local data mirror."""
    index = _task_manager().task_index
    found = []
    for name in parse_tasks(names):
        config = index[name].cfg
        if mirror_file(config["dataset_path"], config.get("dataset_name"), _eval_split(config)) is not None:
            found.append(name)
    return found


def load_tasks(names: Sequence[str]) -> ZeroShotTasks:
    """Build the harness tasks (mirror first, Hub otherwise); fails on the first task without data."""
    manager = _task_manager()
    built = ZeroShotTasks(tasks={})
    for name in parse_tasks(names):
        built.tasks[name], built.data[name] = _build_task(manager, name)
    return built


def _wrap(model: nn.Module, tokenizer: Any, batch_size: int) -> Any:
    from lm_eval.models.huggingface import HFLM

    with _harness_warnings_muted():
        return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)


def evaluate_zeroshot(
    model: nn.Module,
    tokenizer: Any,
    tasks: Sequence[str] | ZeroShotTasks,
    limit: int | None = None,
    batch_size: int = 1,
    seed: int = DEFAULT_SEED,
    progress: bool = True,
) -> list[TaskScore]:
    """Zero-shot scores of an already-loaded causal LM, one per task, in task order.

    `limit` evaluates only the first N examples of each task (a quick look, not a paper number). The model
    is evaluated in eval mode and handed back in the mode it came in. The harness has no switch for all
    of its progress bars, so `progress=False` sends its stderr to a buffer while it runs (errors still
    raise).
    """
    from lm_eval import evaluator

    if limit is not None and limit < 1:
        raise SemisparseError(f"`limit`={limit} is invalid: use 1 or more (or leave it unset for all)")
    if batch_size < 1:
        raise SemisparseError(f"`batch_size`={batch_size} is invalid: use 1 or more")
    built = tasks if isinstance(tasks, ZeroShotTasks) else load_tasks(tasks)
    for task in built.tasks.values():
        task.set_config(key="num_fewshot", value=0)
        task.set_fewshot_seed(seed=seed)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)

    was_training = model.training
    quiet = nullcontext() if progress else redirect_stderr(io.StringIO())
    try:
        with quiet:
            results = evaluator.evaluate(
                lm=_wrap(model, tokenizer, batch_size),
                task_dict={"tasks": built.tasks},
                limit=limit,
                bootstrap_iters=_BOOTSTRAP_ITERS,
                log_samples=False,
            )
    finally:
        model.train(was_training)
    return [_score(name, results, built.data[name]) for name in built.tasks]


def _score(name: str, results: dict[str, Any], data: TaskData) -> TaskScore:
    """Pick the reported metrics (filter "none") out of the harness's result dict."""
    metrics = {}
    for key, value in results["results"][name].items():
        metric, _, filter_name = key.partition(",")
        if filter_name == "none" and metric in _REPORTED and isinstance(value, int | float):
            metrics[metric] = float(value)
    return TaskScore(name, metrics, int(results["n-samples"][name]["effective"]), data)
