"""Zero-shot accuracy through lm-evaluation-harness, with task data read from the local mirror.

The harness stays the authority on each task's prompt, answer choices and metrics; we only change where its
rows come from. A task whose evaluation split is in the mirror (`<data dir>/<dataset path>/<config>/<split>
.jsonl`, in the Hub's schema) is pointed at that file through the harness's own `json` dataset route, so the
run is offline and pinned by the file's sha256; any other task loads from the Hub as the harness always does.
Any task of the harness's registry can be named: the nine the 2:4 papers report are looked up in a small index
of their own folders (milliseconds), any other name in the harness's full registry (built once, seconds).
Groups and tags (`mmlu`, `ai2_arc`) are refused: each of their tasks is scored on its own when named.
The model is handed over as an object, so whatever modules it holds (sparse layers, SLoRB branches) run
exactly as they do everywhere else.
"""

from __future__ import annotations

import difflib
import io
import logging
import random
import warnings
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

# The tasks the 2:4 papers report, in their usual table order (`all`); any other harness task may be named.
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
    """`"all"`, a comma-separated string or a list of task names -> validated names, in the given order.

    `all` stands for the nine `TASKS`; any other name must be a task of the harness's registry (checked
    against the full registry only for names outside the fast index). A tag (`ai2_arc`) stands for its tasks,
    as in the harness; a group (`mmlu`) is refused, since its score is an aggregate we do not compute.
    """
    if spec is None:
        return []
    names = spec.split(",") if isinstance(spec, str) else list(spec)
    expanded: list[str] = []
    for name in (name.strip() for name in names):
        if name == "all":
            expanded.extend(TASKS)
        elif name in TASKS:
            expanded.append(name)
        elif name:
            expanded.extend(_tag_tasks(name) or [name])
    names = list(dict.fromkeys(expanded))
    for name in names:
        if name not in TASKS:
            _task_entry(name)
    return names


def _tag_tasks(name: str) -> list[str]:
    """The tasks of a harness tag (a plain list of tasks, no aggregate), or [] if `name` is no tag."""
    entry = _task_manager().task_index.get(name)
    if entry is not None and _is_single_task(entry):
        return []
    # A tag may span folders outside the fast index, so only the full registry knows all of its tasks.
    entry = _full_task_manager().task_index.get(name)
    return sorted(entry.tags) if entry is not None and entry.kind.name == "TAG" else []


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


@contextmanager
def _download_bars(enabled: bool) -> Iterator[None]:
    """Switch off (when not `enabled`) the bars of `datasets` ("Generating test split") and of the Hub."""
    if enabled:
        yield
        return
    import datasets
    import huggingface_hub.utils as hub_utils

    datasets_on = not datasets.are_progress_bars_disabled()
    hub_on = not hub_utils.are_progress_bars_disabled()
    with warnings.catch_warnings():  # an HF_*_DISABLE_PROGRESS_BARS=0 environment wins, with a warning
        warnings.simplefilter("ignore")
        datasets.disable_progress_bars()
        hub_utils.disable_progress_bars()
    try:
        yield
    finally:
        if datasets_on:
            datasets.enable_progress_bars()
        if hub_on:
            hub_utils.enable_progress_bars()


@cache
def _task_manager() -> Any:
    """The fast index: only the harness folders that define `TASKS`."""
    import lm_eval.tasks
    from lm_eval.tasks import TaskManager

    root = Path(lm_eval.tasks.__file__).parent
    folders = sorted({str(root / folder) for folder in _TASK_FOLDERS.values()})
    with _harness_warnings_muted():
        return TaskManager(include_defaults=False, include_path=folders)


@cache
def _full_task_manager() -> Any:
    """The harness's whole registry (every task, group and tag it ships), for names outside the fast index."""
    from lm_eval.tasks import TaskManager

    with _harness_warnings_muted():
        return TaskManager()


def _is_single_task(entry: Any) -> bool:
    return entry.kind.name in ("TASK", "PY_TASK")


def _group_tasks(index: dict[str, Any], member: Any, seen: set[str] | None = None) -> list[str]:
    """The single tasks a harness group or tag (a name, or an inline group of a group's list) expands to."""
    seen = set() if seen is None else seen
    if isinstance(member, dict):
        if "group" not in member:
            return [str(member.get("task"))]
        children = member.get("task") or [member["group"]]
    elif member in seen:
        return []
    else:
        seen.add(member)
        entry = index.get(member)
        if entry is None or _is_single_task(entry):
            return [member]
        if entry.kind.name == "TAG":
            return sorted(entry.tags)
        children = (entry.cfg or {}).get("task") or []
    children = children if isinstance(children, list) else [children]
    return list(dict.fromkeys(task for child in children for task in _group_tasks(index, child, seen)))


def _task_entry(name: str) -> tuple[Any, Any]:
    """(task manager, index entry) of a single harness task: the fast index first, else the full registry."""
    fast = _task_manager()
    entry = fast.task_index.get(name)
    if entry is not None and _is_single_task(entry):
        return fast, entry
    full = _full_task_manager()
    entry = full.task_index.get(name)
    if entry is None:
        if name in TASKS:
            raise SemisparseError(
                f"the installed lm-eval does not define task '{name}'; "
                "install a version in semisparse's range"
            )
        # A task named after something else than its folder (siqa/ defines social_iqa) is found by its folder.
        in_folder = [
            task
            for task, found in full.task_index.items()
            if _is_single_task(found) and found.yaml_path is not None and found.yaml_path.parent.name == name
        ]
        close = list(dict.fromkeys(in_folder[:3] + difflib.get_close_matches(name, full.all_tasks, n=3)))[:4]
        hint = f"closest: {', '.join(close)}" if close else "no harness task has a close name"
        raise SemisparseError(
            f"unknown task '{name}' in `tasks` ({hint}): use 'all', some of {','.join(TASKS)} "
            "or any lm-evaluation-harness task name"
        )
    if not _is_single_task(entry):
        members = _group_tasks(full.task_index, name)
        shown = ", ".join(members[:3]) + (", ..." if len(members) > 3 else "")
        raise SemisparseError(
            f"'{name}' in `tasks` is an lm-evaluation-harness group of {len(members)} tasks ({shown}); "
            "semisparse scores single tasks, not a group's aggregate: name the tasks you want"
        )
    return full, entry


def _eval_split(config: dict[str, Any]) -> str | None:
    """The split the harness scores: the test split when the task has one, else validation (None: neither)."""
    return config.get("test_split") or config.get("validation_split")


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


def _built_split(task: Any) -> str:
    """The split a built task scores, for tasks whose config does not say it (the harness's Python tasks)."""
    for split, has_docs in (("test", "has_test_docs"), ("validation", "has_validation_docs")):
        try:
            if getattr(task, has_docs)():
                return split
        except Exception:  # only a label for the report
            continue
    return "unknown"


def _build_task(name: str) -> tuple[Any, TaskData]:
    manager, entry = _task_entry(name)
    config = entry.cfg or {}
    # Only YAML tasks with a Hub dataset can be pointed at a mirror file; the harness's Python tasks (and
    # tasks with their own loaders) read their data their own way.
    path = config.get("dataset_path") if "class" not in config else None
    config_name, split = config.get("dataset_name"), _eval_split(config)
    local = mirror_file(path, config_name, split) if path and split else None
    overrides = {"task": name} if local is None else _mirror_override(name, config, local)
    try:
        with _harness_warnings_muted():
            task = manager.load({"group": "semisparse", "task": [overrides]})["tasks"][name]
    except ImportError as err:
        package = err.name or (str(err).strip().splitlines() or ["?"])[0]
        raise SemisparseError(
            f"task '{name}' needs the Python package '{package}', which is not installed; pip install it"
        ) from err
    except Exception as err:
        if local is not None:
            where = f"in {local} is unreadable"
        elif path and split:
            where = "is neither in the data mirror nor on the Hub"
        else:
            raise SemisparseError(
                f"data of task '{name}' could not be loaded ({type(err).__name__}); the harness loads it "
                "with its own code, which the data mirror cannot stand in for, so it needs the Hub"
            ) from err
        raise SemisparseError(
            f"data of task '{name}' {where} ({type(err).__name__}); "
            f"put its {split} rows at {expected_location(path, config_name, split)}"
        ) from err
    path = path or getattr(task, "DATASET_PATH", None)
    config_name = config_name or getattr(task, "DATASET_NAME", None)
    split = split or _built_split(task)
    dataset = "/".join(part for part in (path, config_name) if part)
    n_total = len(task.eval_docs)
    if local is None:
        try:
            fingerprint = getattr(task.dataset[split], "_fingerprint", None)
        except (KeyError, TypeError, AttributeError):
            fingerprint = None
        return task, TaskData(name, "hub", dataset, split, None, None, fingerprint, n_total)
    root = data_dir()
    relative = local.relative_to(root).as_posix() if root is not None else str(local)
    return task, TaskData(name, "mirror", dataset, split, relative, file_sha256(local), None, n_total)


def mirrored_tasks(names: Sequence[str] = TASKS) -> list[str]:
    """The tasks among `names` whose evaluation split is in the local data mirror."""
    found = []
    for name in parse_tasks(names):
        config = _task_entry(name)[1].cfg or {}
        path, split = config.get("dataset_path"), _eval_split(config)
        if path and split and "class" not in config and mirror_file(path, config.get("dataset_name"), split):
            found.append(name)
    return found


def load_tasks(names: Sequence[str], progress: bool = True) -> ZeroShotTasks:
    """Build the harness tasks (mirror first, Hub otherwise); fails on the first task without data.

    `progress=False` keeps the bars of `datasets` (reading a mirror file: "Generating test split") and of
    Hub downloads off the terminal; their previous state is restored afterwards.
    """
    task_names = parse_tasks(names)
    built = ZeroShotTasks(tasks={})
    with _download_bars(progress):
        for name in task_names:
            built.tasks[name], built.data[name] = _build_task(name)
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
    built = tasks if isinstance(tasks, ZeroShotTasks) else load_tasks(tasks, progress)
    for task in built.tasks.values():
        task.set_config(key="num_fewshot", value=0)
        task.set_fewshot_seed(seed=seed)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)

    was_training = model.training
    quiet = nullcontext() if progress else redirect_stderr(io.StringIO())
    try:
        with quiet, _download_bars(progress):
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
