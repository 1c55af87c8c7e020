"""`TrainConfig`: every knob of a training run, validated up front and saved as `config.yaml` in the run.

A run is fully described by this object plus the method's own settings (`method`), so a YAML recipe, the
CLI flags and a resumed run all go through the same validation, and a checkpoint can tell whether it was
written by the same run (`fingerprint`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal, Self

import yaml

from semisparse.errors import SemisparseError
from semisparse.settings import Settings, setting
from semisparse.training.corpus import check_corpus_spec, check_eval_corpus

_SUFFIXES = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9, "t": 10**12}
_TOKENS = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)(?:e(\d+))?\s*([kmbgt]?)\s*$", re.IGNORECASE)
_DEVICE = re.compile(r"^(cpu|mps|cuda(:\d+)?)$")
_REQUIRED = ("model", "output")
# Fields that may change between an interrupted run and its resumption without changing what is trained.
_RUNTIME_FIELDS = frozenset(
    {
        "output",
        "device",
        "eval_every",
        "eval_windows",
        "eval_seqlen",
        "eval_corpus",
        "checkpoint_every",
        "keep_checkpoints",
        "tensorboard",
        "max_bad_steps",
        "gradient_checkpointing",
    }
)
# Fields that only shape the learning rate and clipping from a step on: a resumed run may change them when
# asked to explicitly (`allow_schedule_change`), e.g. to continue with a lower `lr` after a divergence.
SCHEDULE_FIELDS = frozenset({"lr", "min_lr_ratio", "warmup_steps", "grad_clip"})


def parse_tokens(value: int | float | str) -> int:
    """A token budget from `100M`, `1.5B`, `250k`, `1e6` or a plain number."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise SemisparseError(f"token budget {value!r} is not a number; write `tokens` like 100M")
    if isinstance(value, int | float):
        try:
            number = float(value)
        except OverflowError:
            number = math.inf
    else:
        match = _TOKENS.match(value.replace("_", ""))
        if not match:
            raise SemisparseError(
                f"cannot read the token budget '{value}'; use a number with a k/M/B suffix, e.g. 100M"
            )
        mantissa, exponent, suffix = match.groups()
        # float() of the text saturates to inf instead of building a huge integer power of ten
        number = float(f"{mantissa}e{exponent or 0}") * _SUFFIXES[suffix.lower()]
    if not math.isfinite(number):
        raise SemisparseError(f"token budget {value} is not a finite number; write `tokens` like 100M")
    if number < 1:
        raise SemisparseError(f"token budget {value} is not positive; write `tokens` like 100M")
    return round(number)


@dataclass
class TrainConfig(Settings):
    """A training run. `micro_batch` is per process; one optimizer step sees
    micro_batch · grad_accum · world_size sequences of `seq_len` tokens."""

    owner: ClassVar[str] = "training"

    model: str = setting(dataclasses.MISSING, "model name, directory or .gguf file to train")
    output: str = setting(dataclasses.MISSING, "run directory: config, metrics, checkpoints, final model")
    corpus: str = setting(
        "wikipedia", "training text: wikipedia (data mirror), a .txt/.jsonl(.gz) file or org/name[:config]"
    )
    tokens: int = setting(10_000_000, "token budget: a number or 100M, 1.5B, 250k", minimum=1)
    seq_len: int = setting(1024, "tokens per training sequence, at least 2", minimum=2)
    micro_batch: int = setting(8, "sequences per forward pass and process", minimum=1)
    grad_accum: int = setting(1, "micro-batches per optimizer step", minimum=1)
    lr: float = setting(2e-4, "peak learning rate of the method's main trained parameters", above=0)
    min_lr_ratio: float = setting(0.1, "final lr as a fraction of the peak, in [0, 1]", minimum=0)
    warmup_steps: int | None = setting(None, "linear warm-up steps (none: 1% of the steps)", minimum=0)
    weight_decay: float = setting(0.1, "AdamW weight decay", minimum=0)
    betas: tuple[float, float] = setting((0.9, 0.95), "AdamW betas, each in [0, 1)")
    eps: float = setting(1e-8, "AdamW epsilon", above=0)
    grad_clip: float = setting(1.0, "gradient-norm clip, 0 = off", minimum=0)
    eval_every: int = setting(500, "evaluate every K optimizer steps, 0 = only at the end", minimum=0)
    eval_windows: int = setting(16, "perplexity windows per evaluation, 0 = no evaluation", minimum=0)
    eval_seqlen: int | None = setting(None, "perplexity window length (none: seq_len)", minimum=1)
    eval_corpus: str = setting("wikitext2", "evaluation text: wikitext2 or a local text file")
    checkpoint_every: int = setting(500, "checkpoint every K steps, 0 = only on SIGINT/SIGTERM", minimum=0)
    keep_checkpoints: int = setting(1, "how many recent checkpoints to keep", minimum=1)
    seed: int = setting(0, "seed of data order, dropout and method randomness")
    device: str | None = setting(None, "where to train: cpu, cuda or cuda:N (none: cuda if available)")
    autocast: Literal["auto", "bf16", "off"] = setting(
        "auto", "mixed precision: auto = bf16 on CUDA, fp32 on CPU"
    )
    gradient_checkpointing: bool = setting(False, "recompute activations to save memory")
    fsdp: bool = setting(False, "shard weights with FSDP2 across torchrun's GPU processes")
    tensorboard: bool = setting(False, "also log to OUT/tensorboard (needs the tensorboard package)")
    max_bad_steps: int = setting(5, "stop after this many non-finite steps in a row", minimum=1)
    method_name: str = setting("dense", "the registered trainer that runs (dense, ast, maskllm)")
    method: dict[str, Any] = setting({}, "the trainer's own settings (its config as a mapping)")

    def __post_init__(self) -> None:
        # The budget's own notation (100M, 1.5B) is read before the generic coercion to int.
        self.tokens = parse_tokens(self.tokens)
        super().__post_init__()

    def check(self) -> None:
        if not self.model:
            raise SemisparseError("no model given: set `model` to a model name, directory or .gguf file")
        if not self.output:
            raise SemisparseError("no output directory given: set `output`")
        if self.tokens < self.tokens_per_step():
            raise SemisparseError(
                f"token budget {self.tokens} is smaller than one optimizer step ({self.tokens_per_step()} "
                "tokens = `micro_batch` x `grad_accum` x `seq_len`); raise `tokens` or shrink the batch"
            )
        if self.min_lr_ratio > 1:
            raise SemisparseError(f"`min_lr_ratio`={self.min_lr_ratio} must lie in [0, 1]")
        if self.warmup_steps is not None and self.warmup_steps >= self.total_steps():
            raise SemisparseError(
                f"warm-up of {self.warmup_steps} steps is not shorter than the run "
                f"({self.total_steps()} steps); lower `warmup_steps` or raise `tokens`"
            )
        if not all(0 <= beta < 1 for beta in self.betas):
            raise SemisparseError(f"`betas`={list(self.betas)} must be two numbers in [0, 1)")
        if self.device is not None and not _DEVICE.match(self.device):
            raise SemisparseError(f"training setting `device`={self.device!r} must be cpu, cuda or cuda:N")
        if not isinstance(self.method, Mapping):
            raise SemisparseError("the `method` section of the config must be a mapping of settings")
        self.method = dict(self.method)
        check_corpus_spec(self.corpus)
        if self.eval_windows:
            check_eval_corpus(self.eval_corpus)

    # --- derived quantities -------------------------------------------------------------------------
    def sequences_per_step(self, world_size: int = 1) -> int:
        return self.micro_batch * self.grad_accum * world_size

    def tokens_per_step(self, world_size: int = 1) -> int:
        return self.sequences_per_step(world_size) * self.seq_len

    def total_steps(self, world_size: int = 1) -> int:
        """Optimizer steps the budget pays for: tokens // (micro_batch · grad_accum · seq_len · world)."""
        return self.tokens // self.tokens_per_step(world_size)

    def warmup(self, total_steps: int) -> int:
        return self.warmup_steps if self.warmup_steps is not None else total_steps // 100

    def effective_eval_seqlen(self) -> int:
        return self.eval_seqlen or self.seq_len

    def check_world(self, world_size: int) -> None:
        """Re-check the budget once the number of processes is known."""
        if self.total_steps(world_size) < 1:
            raise SemisparseError(
                f"token budget {self.tokens} is smaller than one optimizer step over {world_size} processes "
                f"({self.tokens_per_step(world_size)} tokens); raise `tokens` or shrink the batch"
            )
        if self.warmup_steps is not None and self.warmup_steps >= self.total_steps(world_size):
            raise SemisparseError(
                f"warm-up of {self.warmup_steps} steps is not shorter than the run over {world_size} "
                f"processes ({self.total_steps(world_size)} steps); lower `warmup_steps`"
            )

    def check_model(self, context: int) -> None:
        """Sequence lengths against the model's context, known only once the model is loaded."""
        if self.seq_len > context:
            raise SemisparseError(
                f"`seq_len` {self.seq_len} exceeds the model's context of {context}; "
                f"set `seq_len` to {context} or less"
            )
        if self.eval_windows and self.effective_eval_seqlen() > context:
            raise SemisparseError(
                f"`eval_seqlen` {self.effective_eval_seqlen()} exceeds the model's context of {context}; "
                f"set `eval_seqlen` to {context} or less"
            )

    # --- serialisation ------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["betas"] = list(self.betas)
        return data

    def to_yaml(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> Self:
        """The config from a recipe or a saved `config.yaml`; `model` and `output` are required."""
        if isinstance(values, Mapping):
            missing = [f"`{name}`" for name in _REQUIRED if name not in values]
            if missing:
                raise SemisparseError(f"the training config lacks {' and '.join(missing)}: add it")
        return super().from_mapping(values)

    @classmethod
    def from_yaml(cls, path: str | Path) -> TrainConfig:
        return cls.from_mapping(read_yaml_mapping(path))

    def fingerprint_fields(self) -> dict[str, Any]:
        """What decides the trained result: everything except where/how often to log, eval and save."""
        return {k: v for k, v in self.to_dict().items() if k not in _RUNTIME_FIELDS}

    def fingerprint(self) -> str:
        text = json.dumps(self.fingerprint_fields(), sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def read_yaml_mapping(path: str | Path) -> dict[str, Any]:
    """A YAML file that must hold one mapping (a recipe or a saved config)."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise SemisparseError(f"recipe {path} does not exist; check the path")
    try:
        data = yaml.safe_load(file.read_text())
    except yaml.YAMLError as err:
        raise SemisparseError(f"{path} is not valid YAML ({type(err).__name__}); fix the file") from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SemisparseError(f"{path} must hold a mapping of settings at the top level")
    return data
