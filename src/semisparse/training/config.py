"""`TrainConfig`: every knob of a training run, validated up front and saved as `config.yaml` in the run.

A run is fully described by this object plus the method's own settings (`method`), so a YAML recipe, the
CLI flags and a resumed run all go through the same validation, and a checkpoint can tell whether it was
written by the same run (`fingerprint`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from semisparse.errors import SemisparseError

AUTOCAST_MODES = ("auto", "bf16", "off")
_SUFFIXES = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9, "t": 10**12}
_TOKENS = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)(?:e(\d+))?\s*([kmbgt]?)\s*$", re.IGNORECASE)
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


def parse_tokens(value: int | float | str) -> int:
    """A token budget from `100M`, `1.5B`, `250k`, `1e6` or a plain number."""
    if isinstance(value, bool):
        raise SemisparseError(f"token budget {value!r} is not a number; use e.g. --tokens 100M")
    if isinstance(value, int | float):
        number = float(value)
    else:
        match = _TOKENS.match(str(value).replace("_", ""))
        if not match:
            raise SemisparseError(
                f"cannot read the token budget '{value}'; use a number with a k/M/B suffix, e.g. 100M"
            )
        mantissa, exponent, suffix = match.groups()
        number = float(mantissa) * 10 ** int(exponent or 0) * _SUFFIXES[suffix.lower()]
    if number < 1:
        raise SemisparseError(f"token budget {value} is not positive; use e.g. --tokens 100M")
    return round(number)


def _positive(name: str, value: Any, flag: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise SemisparseError(f"{name} must be a positive integer (got {value!r}); fix {flag}")


def _non_negative(name: str, value: Any, flag: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise SemisparseError(f"{name} must be >= 0 (got {value!r}); fix {flag}")


@dataclass
class TrainConfig:
    """A training run. `micro_batch` is per process; one optimizer step sees
    micro_batch · grad_accum · world_size sequences of `seq_len` tokens."""

    model: str
    output: str
    corpus: str = "wikipedia"
    tokens: int = 10_000_000
    seq_len: int = 1024
    micro_batch: int = 8
    grad_accum: int = 1
    lr: float = 2e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int | None = None  # None: 1% of the optimizer steps
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0 disables clipping
    eval_every: int = 500  # optimizer steps; 0 evaluates only at the end
    eval_windows: int = 16  # 0 disables evaluation
    eval_seqlen: int | None = None  # None: seq_len
    eval_corpus: str = "wikitext2"
    checkpoint_every: int = 500  # 0: only on SIGINT/SIGTERM
    keep_checkpoints: int = 1
    seed: int = 0
    device: str | None = None
    autocast: str = "auto"  # auto: bf16 on CUDA, fp32 on CPU
    gradient_checkpointing: bool = False
    fsdp: bool = False
    tensorboard: bool = False
    max_bad_steps: int = 5
    method_name: str = "dense"
    method: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        from semisparse.training.corpus import check_corpus_spec, check_eval_corpus

        self.tokens = parse_tokens(self.tokens)
        if not isinstance(self.model, str) or not self.model:
            raise SemisparseError("no model given; pass a model name, directory or .gguf file")
        if not isinstance(self.output, str) or not self.output:
            raise SemisparseError("no output directory given; pass -o OUT")
        _positive("seq_len", self.seq_len, "--seq-len")
        if self.seq_len < 2:
            raise SemisparseError(
                "seq_len must be at least 2 tokens (an input and a target); raise --seq-len"
            )
        _positive("micro_batch", self.micro_batch, "--micro-batch")
        _positive("grad_accum", self.grad_accum, "--grad-accum")
        if self.tokens < self.tokens_per_step():
            raise SemisparseError(
                f"token budget {self.tokens} is smaller than one optimizer step ({self.tokens_per_step()} "
                "tokens = micro_batch x grad_accum x seq_len); raise --tokens or shrink the batch"
            )
        if not isinstance(self.lr, int | float) or not self.lr > 0:
            raise SemisparseError(f"learning rate must be positive (got {self.lr}); fix --lr")
        if not 0 <= self.min_lr_ratio <= 1:
            raise SemisparseError(f"min_lr_ratio must lie in [0, 1] (got {self.min_lr_ratio}); fix it")
        if self.warmup_steps is not None:
            _non_negative("warmup_steps", self.warmup_steps, "--warmup-steps")
            if self.warmup_steps >= self.total_steps():
                raise SemisparseError(
                    f"warm-up of {self.warmup_steps} steps is not shorter than the run "
                    f"({self.total_steps()} steps); lower --warmup-steps or raise --tokens"
                )
        _non_negative("weight_decay", self.weight_decay, "--weight-decay")
        self.betas = tuple(self.betas)
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise SemisparseError(f"betas must be two numbers in [0, 1) (got {self.betas}); fix betas")
        if not self.eps > 0:
            raise SemisparseError(f"eps must be positive (got {self.eps}); fix eps")
        _non_negative("grad_clip", self.grad_clip, "--grad-clip (0 disables clipping)")
        _non_negative("eval_every", self.eval_every, "--eval-every")
        _non_negative("eval_windows", self.eval_windows, "--eval-windows")
        if self.eval_seqlen is not None:
            _positive("eval_seqlen", self.eval_seqlen, "--eval-seqlen")
        _non_negative("checkpoint_every", self.checkpoint_every, "--checkpoint-every")
        _positive("keep_checkpoints", self.keep_checkpoints, "--keep-checkpoints")
        _positive("max_bad_steps", self.max_bad_steps, "max_bad_steps")
        if self.autocast not in AUTOCAST_MODES:
            choices = ", ".join(AUTOCAST_MODES)
            raise SemisparseError(f"unknown autocast '{self.autocast}'; use one of {choices}")
        if not isinstance(self.method, dict):
            raise SemisparseError("the 'method' section of the config must be a mapping of settings")
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
                f"({self.tokens_per_step(world_size)} tokens); raise --tokens or shrink the batch"
            )
        if self.warmup_steps is not None and self.warmup_steps >= self.total_steps(world_size):
            raise SemisparseError(
                f"warm-up of {self.warmup_steps} steps is not shorter than the run over {world_size} "
                f"processes ({self.total_steps(world_size)} steps); lower --warmup-steps"
            )

    def check_model(self, context: int) -> None:
        """Sequence lengths against the model's context, known only once the model is loaded."""
        if self.seq_len > context:
            raise SemisparseError(
                f"seq_len {self.seq_len} exceeds the model's context of {context}; "
                f"use --seq-len {context} or less"
            )
        if self.eval_windows and self.effective_eval_seqlen() > context:
            raise SemisparseError(
                f"eval_seqlen {self.effective_eval_seqlen()} exceeds the model's context of {context}; "
                f"use --eval-seqlen {context} or less"
            )

    # --- serialisation ------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["betas"] = list(self.betas)
        return data

    def to_yaml(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise SemisparseError(
                f"unknown training setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
            )
        missing = [name for name in ("model", "output") if name not in data]
        if missing:
            raise SemisparseError(f"the config lacks {', '.join(missing)}; add it")
        return cls(**data)

    @classmethod
    def from_yaml(cls, path: str | Path) -> TrainConfig:
        return cls.from_dict(read_yaml_mapping(path))

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
