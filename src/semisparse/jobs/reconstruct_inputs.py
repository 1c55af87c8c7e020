"""What the reconstruct job's PRUNED argument names, and the checks that it fits the dense MODEL, all
run before any calibration or training so that a wrong input costs seconds and writes nothing."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from semisparse import nm, registry
from semisparse.errors import SemisparseError
from semisparse.export import read_metadata
from semisparse.modules import weight_matrix
from semisparse.nm import NMPattern
from semisparse.reconstruction.config import ReconstructConfig


def pruned_kind(pruned: str) -> str:
    """`model`, `masks` or `pruner`: what the PRUNED argument names."""
    path = Path(pruned).expanduser()
    if path.is_dir():
        return "model"
    if path.is_file():
        if path.name.lower().endswith(".npz"):
            return "masks"
        raise SemisparseError(
            f"`pruned` {pruned} is a file but not a .npz mask file: pass a pruned model directory, "
            "a mask file or a pruner"
        )
    if pruned in registry.names("pruner"):
        return "pruner"
    raise SemisparseError(
        f"`pruned` '{pruned}' is neither a pruned model directory, a .npz mask file nor a registered pruner "
        f"({', '.join(registry.names('pruner'))})"
    )


def resolve_pattern(config: ReconstructConfig, kind: str, pruned: str) -> tuple[NMPattern, list, list]:
    """The N:M pattern and layer globs: the config's, else those the pruned directory was saved with."""
    include, exclude = list(config.include), list(config.exclude)
    pattern = config.pattern
    if kind == "model":
        meta = read_metadata(pruned) or {}
        saved = meta.get("pattern")
        if saved is None and meta.get("sparsity") is not None:
            raise SemisparseError(
                f"{pruned} was pruned to unstructured {meta['sparsity']:.0%} sparsity; reconstruct needs an "
                "N:M pattern: prune with `pattern` (e.g. 2:4)"
            )
        if saved is not None and pattern is not None and str(nm.parse_pattern(saved)) != pattern:
            raise SemisparseError(
                f"{pruned} was pruned to {saved}, not {pattern}: drop `pattern` or pass {saved}"
            )
        pattern = pattern or saved
        if not include and not exclude:
            include, exclude = list(meta.get("include", ())), list(meta.get("exclude", ()))
    return nm.parse_pattern(pattern or "2:4"), include, exclude


def check_fits(
    dense: nn.Module, sparse: nn.Module, targets: list[str], pruned: str, model: str, pattern: NMPattern
) -> None:
    """A pruned model must have MODEL's targets with the same shapes, each following the pattern."""
    if type(dense) is not type(sparse):
        raise SemisparseError(
            f"{pruned} is a {type(sparse).__name__}, {model} a {type(dense).__name__}: "
            "pass the model it was pruned from"
        )
    for name in targets:
        try:
            module = sparse.get_submodule(name)
        except AttributeError:
            raise SemisparseError(
                f"{pruned} has no layer {name}, which {model} has: pass the model it was pruned from"
            ) from None
        want = tuple(weight_matrix(dense.get_submodule(name)).shape)
        try:
            got = tuple(weight_matrix(module).shape)
        except TypeError:
            got = None
        if got != want:
            raise SemisparseError(
                f"layer {name} of {pruned} has shape {got}, {model}'s {want}: "
                "pass the model it was pruned from"
            )
        if not nm.is_nm(weight_matrix(module).detach(), pattern.n, pattern.m):
            raise SemisparseError(
                f"layer {name} of {pruned} is not {pattern} sparse: prune it to {pattern} first, "
                "or pass its own `pattern`"
            )
