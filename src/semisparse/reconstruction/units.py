"""The pieces block-wise reconstruction is made of: units (what is matched to the dense model), the block
state every unit reads, a unit's starting point, activations, the streaming normalised loss, and per-block
seeding."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from semisparse.errors import SemisparseError
from semisparse.reconstruction.blocks import Call, SubBlock, sub_blocks

BlockCallback = Callable[[int, nn.Module, dict[str, Any]], None]


@dataclass
class Unit:
    """One reconstructed piece of a block: `kind` attn / mlp (with its sub-block), block or linear."""

    name: str
    kind: str
    layers: list[str]
    sub: SubBlock | None = None


@dataclass
class LossStats:
    """Streaming normalised MSE: Σ(y − t)² / (count · var(t)), accumulated in float64."""

    sse: float = 0.0
    total: float = 0.0
    squares: float = 0.0
    count: int = 0

    def add(self, output: Tensor, target: Tensor) -> None:
        self.sse += float((output.double() - target.double()).square().sum())
        self.observe(target)

    def observe(self, target: Tensor) -> None:
        """Count a target towards the variance only."""
        self.total += float(target.double().sum())
        self.squares += float(target.double().square().sum())
        self.count += target.numel()

    @property
    def variance(self) -> float:
        mean = self.total / max(self.count, 1)
        return max(self.squares / max(self.count, 1) - mean * mean, 1e-12)

    @property
    def loss(self) -> float:
        return self.sse / max(self.count, 1) / self.variance


@dataclass
class Activations:
    """A unit's inputs and targets over all windows, [n, ...] each, and the targets' variance."""

    inputs: Tensor
    targets: Tensor
    variance: float
    call: Call | None = None


@dataclass
class BlockState:
    """The pieces of one block's reconstruction that every unit reads."""

    index: int
    dense: nn.Module
    sparse: nn.Module
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    hidden: Tensor
    masks: dict[str, Tensor] = field(default_factory=dict)  # layer -> kept mask, parameter layout


@dataclass
class UnitStart:
    """A unit's layers as they were before training: weights, biases (by module name) and masks."""

    tensors: dict[str, tuple[Tensor, Tensor | None]]
    masks: dict[str, Tensor]


def snapshot(state: BlockState, unit: Unit) -> UnitStart:
    """Copies of what training a unit changes, so a unit made worse can go back (`restore`)."""
    tensors = {}
    for name in unit.layers:
        module = state.sparse.get_submodule(name)
        bias = None if module.bias is None else module.bias.detach().clone()
        tensors[name] = (module.weight.detach().clone(), bias)
    return UnitStart(tensors, {name: state.masks[name].clone() for name in unit.layers})


def restore(state: BlockState, start: UnitStart) -> None:
    """Put a unit back as `snapshot` saw it (the modules may have been swapped since: copy into them)."""
    with torch.no_grad():
        for name, (weight, bias) in start.tensors.items():
            module = state.sparse.get_submodule(name)
            module.weight.copy_(weight)
            if bias is not None:
                module.bias.copy_(bias)
    state.masks.update(start.masks)


def batches(n: int, size: int) -> list[slice]:
    return [slice(start, min(start + size, n)) for start in range(0, n, size)]


def block_seed(seed: int, index: int) -> int:
    return (seed * 1_000_003 + index) % 2**63


@contextmanager
def block_rng(device: torch.device | None, seed: int) -> Iterator[None]:
    """The global RNG (Gumbel noise) seeded for one block, and the caller's RNG state back afterwards."""
    cuda = (
        [device.index if device.index is not None else torch.cuda.current_device()]
        if (device is not None and device.type == "cuda")
        else []
    )
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)
        yield


def store_rows(buffer: Tensor | None, n: int, start: int, value: Tensor) -> Tensor:
    """Write `value` [b, ...] at rows start.. of a buffer [n, ...], allocating it on the first call."""
    if buffer is None:
        buffer = value.new_empty((n, *value.shape[1:]))
    buffer[start : start + value.shape[0]] = value
    return buffer


def per_window(value: Tensor, windows: int) -> Tensor:
    """[b·T, d] (OPT flattens the batch before its MLP) or [b, T, d] as [b, T, d]."""
    return value.reshape(windows, -1, value.shape[-1])


def units_of(block: nn.Module, layers: Sequence[str], granularity: str) -> list[Unit]:
    if granularity == "block":
        return [Unit("block", "block", list(layers))]
    if granularity == "linear":
        return [Unit(name, "linear", [name]) for name in layers]
    attention, mlp = sub_blocks(block)
    stray = [name for name in layers if not attention.owns(name) and not mlp.owns(name)]
    if stray:
        raise SemisparseError(
            f"layer {stray[0]} of a {type(block).__name__} is in neither its attention ({attention.entry}) "
            f"nor its MLP ({mlp.entry}): leave it out with `exclude`, or use `granularity` block or linear"
        )
    units = []
    for sub in (attention, mlp):
        owned = [name for name in layers if sub.owns(name)]
        if owned:
            units.append(Unit(sub.name, sub.name, owned, sub))
    return units
