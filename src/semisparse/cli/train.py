"""`semisparse train dense|ast|maskllm`: retrain a model on a token budget with the shared loop.

Settings come, lowest precedence first, from TrainConfig's defaults, a YAML `--recipe` (TrainConfig fields
at the top level, the method's settings under `method:`), then the flags given on the command line;
`--set key=value` sets one method setting (repeatable). The methods are imported only when their command
runs, so this module stays cheap to import.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import sys
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource

from semisparse.cli.common import quiet_option, user_errors
from semisparse.errors import SemisparseError
from semisparse.models import DEFAULT_MODEL

# method command -> (module, settings class, method class)
METHODS: dict[str, tuple[str, str, str]] = {
    "dense": ("semisparse.methods.dense", "DenseSettings", "DenseMethod"),
    "ast": ("semisparse.methods.ast", "ASTSettings", "ASTMethod"),
    "maskllm": ("semisparse.methods.maskllm", "MaskLLMSettings", "MaskLLMMethod"),
}
# Training defaults that differ per method (MaskLLM trains its logits without warm-up, METHODS.md §3.6).
METHOD_DEFAULTS: dict[str, dict[str, Any]] = {"maskllm": {"warmup_steps": 0}}
_HELP = {
    "dense": "Dense fine-tuning of all weights (the baseline at the same token budget).",
    "ast": "AST: 2:4 retraining with adaptive masks, distillation, annealed SR-STE and optional SLoRB.",
    "maskllm": "MaskLLM: learn N:M masks of a frozen model with Gumbel-softmax from a one-shot prior.",
}

# (flag, TrainConfig field, click type, help); every default is None = "not given", so a recipe can fill it.
_CONFIG_OPTIONS: list[tuple[str, str, Any, str]] = [
    ("--tokens", "tokens", str, "Token budget, e.g. 100M, 1.5B, 250k (default 10M)."),
    (
        "--corpus",
        "corpus",
        str,
        "wikipedia (data mirror), a .txt/.jsonl(.gz) file or org/name[:config[:split]].",
    ),
    ("--seq-len", "seq_len", int, "Tokens per training sequence (default 1024)."),
    ("--micro-batch", "micro_batch", int, "Sequences per forward pass and process (default 8)."),
    ("--grad-accum", "grad_accum", int, "Micro-batches per optimizer step (default 1)."),
    ("--lr", "lr", float, "Peak learning rate (default 2e-4)."),
    ("--min-lr-ratio", "min_lr_ratio", float, "Final lr as a fraction of the peak (default 0.1)."),
    ("--warmup-steps", "warmup_steps", int, "Linear warm-up steps (default 1% of the steps)."),
    ("--weight-decay", "weight_decay", float, "AdamW weight decay (default 0.1)."),
    ("--grad-clip", "grad_clip", float, "Gradient-norm clip, 0 = off (default 1.0)."),
    (
        "--eval-every",
        "eval_every",
        int,
        "Evaluate perplexity every K steps, 0 = only at the end (default 500).",
    ),
    (
        "--eval-windows",
        "eval_windows",
        int,
        "Perplexity windows per evaluation, 0 = no evaluation (default 16).",
    ),
    ("--eval-seqlen", "eval_seqlen", int, "Perplexity window length (default: --seq-len)."),
    ("--eval-corpus", "eval_corpus", str, "wikitext2 or a local text file (default wikitext2)."),
    ("--checkpoint-every", "checkpoint_every", int, "Checkpoint every K steps, 0 = only on interrupt (500)."),
    ("--keep-checkpoints", "keep_checkpoints", int, "How many recent checkpoints to keep (default 1)."),
    ("--seed", "seed", int, "Seed of data order, dropout and method randomness (default 0)."),
    ("--device", "device", str, "cuda, cuda:1, cpu (default: cuda if available; torchrun: cuda:LOCAL_RANK)."),
    ("--autocast", "autocast", click.Choice(["auto", "bf16", "off"]), "auto = bf16 on CUDA, fp32 on CPU."),
]
_CONFIG_FLAGS: list[tuple[str, str, str]] = [
    ("--gradient-checkpointing", "gradient_checkpointing", "Recompute activations to save memory."),
    ("--fsdp", "fsdp", "Shard weights with FSDP2 across torchrun's GPU processes."),
    ("--tensorboard", "tensorboard", "Also log to OUT/tensorboard (needs the tensorboard package)."),
]


def _is_rank_zero() -> bool:
    return os.environ.get("RANK", "0") == "0"


def _field_hints(settings_cls: type) -> dict[str, Any]:
    return typing.get_type_hints(settings_cls)


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """Turn a command-line string into the type a settings field declares (bool, int, float, str, list)."""
    if not isinstance(value, str):
        return value
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value.strip().lower() in ("none", "null", "") and type(None) in args:
            return None
        inner = [arg for arg in args if arg is not type(None)]
        return _coerce(key, value, inner[0]) if len(inner) == 1 else value
    try:
        if hint is bool:
            lowered = value.strip().lower()
            if lowered not in ("true", "false", "yes", "no", "on", "off", "1", "0"):
                raise ValueError(value)
            return lowered in ("true", "yes", "on", "1")
        if hint is int:
            return int(value)
        if hint is float:
            return float(value)
        if origin in (list, tuple):
            item = args[0] if args else str
            return [_coerce(key, part.strip(), item) for part in value.split(",") if part.strip()]
    except ValueError as err:
        name = getattr(hint, "__name__", str(hint))
        raise SemisparseError(f"setting {key}={value!r} is not a valid {name}; fix --set {key}=...") from err
    return value


def _method_settings(
    name: str, settings_cls: type, recipe: dict[str, Any], assignments: tuple[str, ...]
) -> Any:
    """The method's settings object from the recipe's `method:` section and `--set key=value` pairs."""
    hints = _field_hints(settings_cls)
    values = dict(recipe)
    for assignment in assignments:
        key, sep, value = assignment.partition("=")
        if not sep or not key.strip():
            raise SemisparseError(f"--set {assignment!r} is not key=value; write e.g. --set pattern=2:4")
        values[key.strip().replace("-", "_")] = value
    unknown = sorted(set(values) - set(hints))
    if unknown:
        known = ", ".join(f.name for f in dataclasses.fields(settings_cls)) or "none"
        raise SemisparseError(f"unknown {name} setting(s) {', '.join(unknown)}; known: {known}")
    return settings_cls(**{key: _coerce(key, value, hints[key]) for key, value in values.items()})


def _load_method(name: str) -> tuple[type, type]:
    module_name, settings_name, method_name = METHODS[name]
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise SemisparseError(f"the {name} method is not available ({err}); reinstall semisparse") from err
    return getattr(module, settings_name), getattr(module, method_name)


def train_from_cli(
    name: str,
    model: str | None,
    out: str,
    recipe: str | None,
    assignments: tuple[str, ...],
    given: dict[str, Any],
    resume: str | None,
    overwrite: bool,
    progress: bool,
) -> Path:
    """Build config and method from recipe + flags, then run the shared loop; returns OUT/model."""
    from semisparse.training.config import TrainConfig, read_yaml_mapping
    from semisparse.training.loop import launch

    if resume is not None and overwrite:
        raise SemisparseError("--resume and --overwrite contradict each other; pass only one")
    data: dict[str, Any] = dict(METHOD_DEFAULTS.get(name, {}))
    method_recipe: dict[str, Any] = {}
    if recipe is not None:
        loaded = read_yaml_mapping(recipe)
        method_recipe = loaded.pop("method", None) or {}
        if not isinstance(method_recipe, dict):
            raise SemisparseError(f"the 'method' section of {recipe} must be a mapping of {name} settings")
        recipe_method = loaded.pop("method_name", name)
        if recipe_method != name:
            raise SemisparseError(
                f"{recipe} is a {recipe_method} recipe; run `semisparse train {recipe_method}`"
            )
        loaded.pop("output", None)
        data.update(loaded)
    data.update(given)
    data["model"] = model or data.get("model") or DEFAULT_MODEL
    data["output"] = out
    settings_cls, method_cls = _load_method(name)
    if "lr" in given and "lr" in _field_hints(settings_cls):
        # A method with its own peak lr (MaskLLM's logits) takes --lr as that lr; `--set lr=` still wins.
        method_recipe = {**method_recipe, "lr": given["lr"]}
    settings = _method_settings(name, settings_cls, method_recipe, assignments)
    config = TrainConfig.from_dict({**data, "method_name": name, "method": dataclasses.asdict(settings)})

    def make_method(total_steps: int, device: str, initialise: bool) -> Any:
        return method_cls.from_pretrained(
            config.model,
            settings,
            total_steps,
            device,
            seed=config.seed,
            initialise=initialise,
            progress=progress,
        )

    return launch(config, make_method, resume=resume, overwrite=overwrite, progress=progress)


def _summary(model_dir: Path) -> str:
    meta = json.loads((model_dir / "semisparse.json").read_text())
    record = meta.get("training", {})
    steps, tokens = record.get("steps"), record.get("tokens_seen")
    line = f"saved {model_dir}: {meta.get('method')}, {steps} steps, {tokens} tokens"
    final = record.get("final_eval")
    if final:
        line += f", perplexity {final['eval_ppl']:.3f} on {final['eval_windows']} windows"
    return line + f", {record.get('wall_seconds')} s"


def _make_command(name: str) -> click.Command:
    def command(
        model: str | None,
        out: str,
        recipe: str | None,
        assignments: tuple[str, ...],
        resume: str | None,
        overwrite: bool,
        quiet: bool,
        **options: Any,
    ) -> None:
        context = click.get_current_context()
        given = {
            field: options[field]
            for _, field, *_ in [*_CONFIG_OPTIONS, *_CONFIG_FLAGS]
            if context.get_parameter_source(field) is not ParameterSource.DEFAULT
        }
        from semisparse.training.loop import TrainingInterrupted

        try:
            model_dir = train_from_cli(
                name, model, out, recipe, assignments, given, resume, overwrite, progress=not quiet
            )
        except TrainingInterrupted as stop:
            click.echo(f"stopped: {stop}", err=True)
            sys.exit(130)
        if _is_rank_zero():
            click.echo(_summary(model_dir))

    decorators: list[Callable[[Any], Any]] = [
        click.command(name, help=_HELP[name] + " Writes OUT/model, OUT/metrics.jsonl and OUT/checkpoints."),
        click.argument("model", required=False),
        click.option("-o", "--output", "out", required=True, help="Run directory (must not exist)."),
        click.option(
            "--recipe", type=click.Path(dir_okay=False), help="YAML with TrainConfig fields + method:."
        ),
        click.option(
            "--set",
            "assignments",
            multiple=True,
            metavar="KEY=VALUE",
            help=f"One {name} method setting (repeatable).",
        ),
    ]
    for flag, field, kind, text in _CONFIG_OPTIONS:
        decorators.append(click.option(flag, field, type=kind, default=None, help=text))
    for flag, field, text in _CONFIG_FLAGS:
        decorators.append(click.option(f"{flag}/--no-{flag[2:]}", field, default=None, help=text))
    decorators += [
        click.option(
            "--resume",
            is_flag=False,
            flag_value="latest",
            default=None,
            help="Continue OUT from its latest checkpoint, or from the given run/checkpoint directory.",
        ),
        click.option("--overwrite", is_flag=True, help="Delete an existing run in OUT and start over."),
        quiet_option,
        user_errors,
    ]
    for decorator in reversed(decorators[1:]):
        command = decorator(command)
    return decorators[0](command)


@click.group("train")
def train() -> None:
    """Retrain MODEL on a token budget: `dense`, `ast` (2:4 AST) or `maskllm` (learned N:M masks).

    Example: semisparse train ast smollm2-135m -o runs/ast --tokens 100M; then semisparse eval runs/ast/model.
    Under `torchrun --nproc-per-node K -m semisparse train ...` it trains data-parallel.
    """


for _name in METHODS:
    train.add_command(_make_command(_name))
