"""Calibration windows as one typed setting, checked against the model before any work starts.

Every technique that needs calibration data (Wanda, SparseGPT, GPTQ, MaskLLM's prior, AST's init and its
Wanda mask score) describes it with one `Calibration` and loads it with `load_calibration`, so the
context-length check, the protocol and the provenance record are written once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from torch import Tensor, nn

from semisparse.data import calibration_ids
from semisparse.errors import SemisparseError
from semisparse.modules import context_length
from semisparse.settings import Settings, setting


@dataclass
class Calibration(Settings):
    """The SparseGPT/Wanda protocol: `nsamples` random windows of `seqlen` tokens from `source`."""

    owner: ClassVar[str] = "calibration"

    source: str = setting("c4", "c4, wikipedia (data mirror) or a local .txt/.jsonl/.jsonl.gz file")
    nsamples: int = setting(128, "calibration windows", minimum=1)
    seqlen: int = setting(2048, "tokens per calibration window", minimum=1)
    seed: int = setting(0, "seed of the window draw")


def load_calibration(
    model: nn.Module, tokenizer: Any, calibration: Calibration
) -> tuple[Tensor, dict[str, Any]]:
    """Token ids [nsamples, seqlen] and their provenance; a window longer than the context is an error."""
    context = context_length(model)
    if calibration.seqlen > context:
        raise SemisparseError(
            f"calibration `seqlen` {calibration.seqlen} exceeds the model's context of {context}: "
            "use a smaller `seqlen`"
        )
    return calibration_ids(
        tokenizer, calibration.source, calibration.nsamples, calibration.seqlen, calibration.seed
    )
