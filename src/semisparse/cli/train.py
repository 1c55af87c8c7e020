"""`semisparse train <method>`: retrain a model on a token budget with the shared loop.

One command per registered trainer (`semisparse.registry`, kind "trainer"), its help from the entry's
summary, built when the group is listed or called. The flags are `TrainConfig` fields, `--set key=value`
sets one of the trainer's own settings and `--recipe` reads both from YAML; how they combine, and the
per-method defaults, is `semisparse.training.recipe.train_configs`. This module only translates the
command line: it passes the given values on as strings (the configs coerce them) and names the flags in
the library's messages.
"""

from __future__ import annotations

import json
import os
import sys
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from semisparse import registry
from semisparse.cli.common import SETTINGS_KEY, cli_message, quiet_option, threads_option, user_errors
from semisparse.settings import SettingInfo, describe, parse_assignments

# TrainConfig fields that are flags of every `train` command (the rest: a recipe).
_FLAG_FIELDS = (
    "tokens",
    "corpus",
    "seq_len",
    "micro_batch",
    "grad_accum",
    "lr",
    "min_lr_ratio",
    "warmup_steps",
    "weight_decay",
    "grad_clip",
    "eval_every",
    "eval_windows",
    "eval_seqlen",
    "eval_corpus",
    "checkpoint_every",
    "keep_checkpoints",
    "seed",
    "device",
    "autocast",
    "gradient_checkpointing",
    "fsdp",
    "tensorboard",
)


_METAVARS = {int: "INTEGER", float: "FLOAT"}


def _is_rank_zero() -> bool:
    return os.environ.get("RANK", "0") == "0"


def _summary(model_dir: Path) -> str:
    meta = json.loads((model_dir / "semisparse.json").read_text())
    record = meta.get("training", {})
    steps, tokens = record.get("steps"), record.get("tokens_seen")
    line = f"saved {model_dir}: {meta.get('method')}, {steps} steps, {tokens} tokens"
    final = record.get("final_eval")
    if final:
        line += f", perplexity {final['eval_ppl']:.3f} on {final['eval_windows']} windows"
    return line + f", {record.get('wall_seconds')} s"


def _flag_option(row: SettingInfo, method_config: type) -> Callable[[Any], Any]:
    """A `--flag` for one TrainConfig field; its default stays None (= not given) so a recipe can fill it."""
    from semisparse.training.config import TrainConfig

    flag = "--" + row.name.replace("_", "-")
    text = f"peak learning rate of {method_config.lr_target}" if row.name == "lr" else row.help
    default = method_config.train_defaults.get(row.name, row.default)
    shown = default is not None and default is not False
    text = text[0].upper() + text[1:] + (f" (default {default})." if shown else ".")
    hint = typing.get_type_hints(TrainConfig)[row.name]
    if hint is bool:
        return click.option(f"{flag}/--no-{flag[2:]}", row.name, default=None, help=text)
    if typing.get_origin(hint) is typing.Literal:
        return click.option(flag, row.name, type=click.Choice(typing.get_args(hint)), default=None, help=text)
    # Values stay strings: TrainConfig coerces them and names the flag in a one-line error.
    kinds = [arg for arg in typing.get_args(hint) or (hint,) if arg is not type(None)]
    metavar = "N" if row.name == "tokens" else _METAVARS.get(kinds[0], "TEXT")
    return click.option(flag, row.name, default=None, metavar=metavar, help=text)


def _make_command(name: str) -> click.Command:
    from semisparse.training.config import TrainConfig

    entry = registry.lookup("trainer", name)
    settings_names = [row.name for row in describe(entry.config)]

    def command(
        model: str | None,
        output: str,
        recipe: str | None,
        assignments: tuple[str, ...],
        resume: str | None,
        overwrite: bool,
        allow_schedule_change: bool,
        quiet: bool,
        **options: Any,
    ) -> None:
        from semisparse.training.loop import TrainingInterrupted
        from semisparse.training.recipe import train

        context = click.get_current_context()
        context.meta[SETTINGS_KEY] = settings_names
        overrides = {field: value for field, value in options.items() if value is not None}
        overrides["output"] = output
        if model is not None:
            overrides["model"] = model
        try:
            model_dir = train(
                name,
                recipe,
                settings=parse_assignments(assignments),
                resume=resume,
                overwrite=overwrite,
                allow_schedule_change=allow_schedule_change,
                progress=not quiet,
                **overrides,
            )
        except TrainingInterrupted as stop:
            click.echo(f"stopped: {cli_message(str(stop), context)}", err=True)
            sys.exit(130)
        if _is_rank_zero():
            click.echo(_summary(model_dir))

    rows = {row.name: row for row in describe(TrainConfig)}
    decorators: list[Callable[[Any], Any]] = [
        click.argument("model", required=False),
        click.option("-o", "--output", "output", required=True, help="Run directory (must not exist)."),
        click.option(
            "--recipe", type=click.Path(dir_okay=False), help="YAML with TrainConfig fields + method:."
        ),
        click.option(
            "--set",
            "assignments",
            multiple=True,
            metavar="KEY=VALUE",
            help=f"One {name} setting (repeatable): {', '.join(settings_names)}.",
        ),
        *(_flag_option(rows[field], entry.config) for field in _FLAG_FIELDS),
        click.option(
            "--resume",
            is_flag=False,
            flag_value="latest",
            default=None,
            help="Continue OUT from its latest checkpoint, or from the given run/checkpoint directory.",
        ),
        click.option(
            "--allow-schedule-change",
            is_flag=True,
            help="With --resume: continue with another --lr, --min-lr-ratio, --warmup-steps or --grad-clip "
            "(logged in metrics.jsonl).",
        ),
        click.option(
            "--overwrite",
            is_flag=True,
            help="Replace an existing run in OUT; the old run is kept until the new one's first checkpoint.",
        ),
        quiet_option,
        threads_option,
        user_errors,
    ]
    for decorator in reversed(decorators):
        command = decorator(command)
    help_text = f"{entry.summary} Writes OUT/model, OUT/metrics.jsonl and OUT/checkpoints."
    return click.command(name, help=help_text)(command)


class _TrainerGroup(click.Group):
    """One subcommand per registered trainer, looked up when the group is listed or a command is called."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(registry.names("trainer"))

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in registry.names("trainer"):
            return None
        return _make_command(cmd_name)


@click.group("train", cls=_TrainerGroup)
def train() -> None:
    """Retrain MODEL on a token budget: `dense`, `ast` (2:4 AST) or `maskllm` (learned N:M masks).

    Example: semisparse train ast smollm2-135m -o runs/ast --tokens 100M; then semisparse eval runs/ast/model.
    Under `torchrun --nproc-per-node K -m semisparse train ...` it trains data-parallel.
    """
