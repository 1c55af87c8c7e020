"""`ReconstructConfig`: the settings of block-wise reconstruction (the `reconstruct` stage and command).

One typed config (see `semisparse.settings`) for the whole technique: where the sparse start comes from
(`pruned`), what is matched (`granularity`, `inputs`), how the kept weights train (`epochs`, `batch_size`,
`lr`, ...), the optional learnable local masks (`learn_mask`, MaskLLM's `alpha`, `tau_*`, `kappa_*`) and
the calibration windows. It is registered as the stage `reconstruct` by `semisparse.jobs.reconstruct`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal, Self

from semisparse import nm
from semisparse.calibration import Calibration
from semisparse.data import CALIBRATION_SOURCES
from semisparse.errors import SemisparseError
from semisparse.modules import layer_filter
from semisparse.settings import Settings, setting

Granularity = Literal["attn-mlp", "block", "linear"]
GRANULARITIES: tuple[str, ...] = ("attn-mlp", "block", "linear")


@dataclass
class ReconstructConfig(Settings):
    """Block-by-block reconstruction of a pruned model against the dense one (`semisparse.reconstruction`).

    `runtime_fields` may change between an interrupted run and its resumption (where, not what, it runs).
    """

    owner: ClassVar[str] = "reconstruct"
    runtime_fields: ClassVar[tuple[str, ...]] = ("device",)

    pruned: str | None = setting(
        None,
        "the sparse start: a pruned model directory, a registered pruner (prunes the model first, on the "
        "same calibration data) or a .npz mask file; none in a recipe: the previous stage's model",
    )
    pattern: str | None = setting(None, "N:M pattern (none: the pruned model's own, else 2:4)")
    granularity: Granularity = setting(
        "attn-mlp",
        "what is matched to the dense model: attn-mlp (attention and MLP sub-blocks in turn), block, "
        "or linear (each target matrix alone, SparseGPT's objective)",
    )
    inputs: Literal["sparse", "dense"] = setting(
        "sparse",
        "inputs of each block: sparse (from the reconstructed blocks before it) or dense (the dense model's)",
    )
    epochs: int = setting(4, "passes over the calibration windows per reconstructed unit", minimum=1)
    batch_size: int = setting(
        1,
        "calibration windows per optimizer step (1: four times the steps of 4 for the same compute, "
        "which reconstructs better; see benchmarks/results/reconstruct_batch_quick_smollm2_cpu.md)",
        minimum=1,
    )
    lr: float = setting(3e-3, "peak AdamW learning rate of the kept weights", above=0)
    weight_decay: float = setting(0.0, "AdamW decoupled weight decay of the kept weights", minimum=0)
    warmup: float = setting(0.1, "fraction of each unit's steps spent warming up the lr", minimum=0)
    min_lr_ratio: float = setting(0.1, "cosine decay ends at this fraction of the peak lr", minimum=0)
    train_bias: bool = setting(True, "also train the target layers' biases (never pruned)")
    revert_worse: bool = setting(
        True,
        "a unit whose training raised its local loss on the calibration windows goes back to its "
        "starting weights (and mask), and so does a block whose output moved further from the dense block's",
    )
    autocast: Literal["auto", "bf16", "off"] = setting(
        "auto",
        "mixed precision of the block forwards and backwards: auto = bf16 on CUDA, float32 on CPU; bf16 on a "
        "CPU with AMX runs the matrix products several times faster (weights and optimizer stay float32)",
    )
    learn_mask: bool = setting(False, "learn each block's N:M masks too (MaskLLM's candidates, local loss)")
    mask_layers: list[str] = setting(
        [],
        "learn_mask: only layers whose names inside a block match these globs learn their masks "
        "(e.g. mlp.*); the others train with theirs fixed (none: every target layer)",
    )
    mask_lr: float = setting(5e-3, "peak AdamW learning rate of the mask logits (learn_mask)", above=0)
    alpha: float = setting(3.0, "prior strength of the pruned model's mask: logit shift in stds", minimum=0)
    logit_noise: bool = setting(
        False,
        "learn_mask: keep MaskLLM's random N(0, 0.01²) logits under the prior (they move ~6% of 2:4 groups' "
        "argmax off the prior before any training); off: the prior alone sets the initial mask",
    )
    hard: bool = setting(
        False, "learn_mask: forward one-hot samples with the soft gradient (straight-through)"
    )
    tau_start: float = setting(4.0, "Gumbel-softmax temperature τ at a block's first step", above=0)
    tau_end: float = setting(0.05, "τ at a block's last joint step (linear in between)", above=0)
    kappa_start: float = setting(1e2, "logit scale κ at a block's first step", above=0)
    kappa_end: float = setting(5e2, "κ at a block's last joint step (linear in between)", above=0)
    fixed_mask_steps: float = setting(
        0.25,
        "learn_mask: kept-weight steps with the argmax mask fixed after the joint phase, "
        "as a fraction of the joint steps",
        minimum=0,
    )
    source: str = setting("c4", "calibration data: c4, wikipedia (data mirror) or a local .txt/.jsonl file")
    nsamples: int = setting(128, "calibration windows", minimum=1)
    seqlen: int = setting(2048, "tokens per calibration window", minimum=1)
    seed: int = setting(0, "seed of the calibration draw, the window order and the mask logits")
    include: list[str] = setting([], "only layers matching these globs")
    exclude: list[str] = setting([], "never layers matching these globs")
    device: str | None = setting(None, "cuda, cuda:1 or cpu (none: cuda if available)")

    def check(self) -> None:
        if self.pattern is not None:
            self.pattern = str(nm.parse_pattern(self.pattern))
        if self.warmup >= 1:
            raise SemisparseError(f"`warmup` {self.warmup} must be below 1 (a fraction of the steps)")
        if self.min_lr_ratio > 1:
            raise SemisparseError(f"`min_lr_ratio` {self.min_lr_ratio} must be at most 1")
        if self.learn_mask and self.alpha == 0 and not self.logit_noise:
            raise SemisparseError(
                "with `alpha` 0 and no `logit_noise` every mask logit starts equal: raise `alpha` (e.g. 3)"
            )
        if self.pruned is not None and not self.pruned.strip():
            raise SemisparseError("`pruned` is empty: name a pruned model directory, a pruner or a mask file")
        if self.source not in CALIBRATION_SOURCES and not Path(self.source).expanduser().is_file():
            raise SemisparseError(
                f"unknown calibration source '{self.source}'; "
                f"use {', '.join(CALIBRATION_SOURCES)} or a .txt/.jsonl file"
            )

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any] | None) -> Self:
        """A recipe section or `--set` pairs; None (a bare `- reconstruct:` in YAML) means all defaults."""
        return super().from_mapping({} if values is None else values)

    def calibration(self) -> Calibration:
        return Calibration(source=self.source, nsamples=self.nsamples, seqlen=self.seqlen, seed=self.seed)

    def filter_fn(self) -> Any:
        return layer_filter(self.include, self.exclude)

    def identity(self) -> dict[str, Any]:
        """What decides the result: every setting but the runtime ones (resuming checks it)."""
        return {key: value for key, value in self.to_dict().items() if key not in self.runtime_fields}
