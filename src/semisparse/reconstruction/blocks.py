"""Inside a decoder block: its attention and MLP sub-blocks per model family, and partial forwards.

A sub-block is named by the block-relative modules where it starts (`entry`: its input is the input of
that module's call) and ends (`exit`: its output is that module's output, the first tensor of a tuple):

| family                          | attention   | MLP                                                |
|---------------------------------|-------------|----------------------------------------------------|
| Llama, Qwen2, Mistral (and kin) | `self_attn` | `mlp`                                              |
| GPT-2 (Conv1D weights)          | `attn`      | `mlp`                                              |
| OPT                             | `self_attn` | `fc1` → `activation_fn` → `fc2`, in the layer      |

The layer norms and residual additions stay outside: a sub-block's input is what its first module
receives (after the norm), its output what its last module returns (before the residual). The block runs
its own code; hooks read a module's input (`input_of`), read its output (`output_of`) and stop the forward
there, or replace a module's output (`replace`), which is how the MLP gets the input the reconstructed
attention gives without knowing where each family keeps its norms.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from semisparse.errors import SemisparseError


class _Stop(Exception):
    """Raised by a hook once it has what it needs, so the rest of the block never runs."""


@dataclass(frozen=True)
class SubBlock:
    """A part of a block reconstructed on its own; `chain` empty: `entry` is called with its own arguments.

    `scope` holds the block-relative module names whose target layers belong to it.
    """

    name: str
    entry: str
    exit: str
    chain: tuple[str, ...] = ()
    scope: tuple[str, ...] = ()

    def owns(self, layer: str) -> bool:
        return any(layer == prefix or layer.startswith(prefix + ".") for prefix in self.scope)


def sub_blocks(block: nn.Module) -> tuple[SubBlock, SubBlock]:
    """The attention and MLP sub-blocks of a decoder block (see the module doc for the families)."""
    attention = next((name for name in ("self_attn", "attn") if hasattr(block, name)), None)
    if attention is not None and isinstance(getattr(block, "mlp", None), nn.Module):
        return SubBlock("attn", attention, attention, scope=(attention,)), SubBlock(
            "mlp", "mlp", "mlp", scope=("mlp",)
        )
    if attention is not None and all(isinstance(getattr(block, n, None), nn.Module) for n in ("fc1", "fc2")):
        chain = ("fc1", "activation_fn", "fc2") if hasattr(block, "activation_fn") else ("fc1", "fc2")
        return SubBlock("attn", attention, attention, scope=(attention,)), SubBlock(
            "mlp", "fc1", "fc2", chain=chain, scope=("fc1", "fc2")
        )
    raise SemisparseError(
        f"granularity attn-mlp does not know the attention and MLP of a {type(block).__name__} "
        "(Llama/Qwen2/Mistral-, GPT-2- and OPT-style blocks are supported): use `granularity` block or linear"
    )


def first_tensor(output: Any) -> Tensor:
    """The hidden state out of a module's return value (a tensor, or a tuple / list starting with one)."""
    if isinstance(output, Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    raise SemisparseError(f"unsupported sub-module output of type {type(output).__name__}")


def _with_first(output: Any, value: Tensor) -> Any:
    if isinstance(output, Tensor):
        return value
    return type(output)([value, *output[1:]]) if isinstance(output, list) else (value, *output[1:])


def _hidden_of(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor:
    if args:
        return args[0]
    if "hidden_states" in kwargs:
        return kwargs["hidden_states"]
    raise SemisparseError("cannot find the hidden states among a sub-module's arguments")


@dataclass
class Call:
    """How a module was called, its hidden-state input left out; `run` calls it again on new states."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    positional: bool

    @classmethod
    def record(cls, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Call:
        if args:
            return cls(tuple(args[1:]), dict(kwargs), True)
        return cls((), {key: value for key, value in kwargs.items() if key != "hidden_states"}, False)

    def run(self, module: nn.Module, hidden: Tensor) -> Any:
        if self.positional:
            return module(hidden, *self.args, **self.kwargs)
        return module(*self.args, hidden_states=hidden, **self.kwargs)


def partial_forward(
    block: nn.Module,
    hidden: Tensor,
    args: tuple[Any, ...],
    kwargs: Mapping[str, Any],
    *,
    input_of: str | None = None,
    output_of: str | None = None,
    replace: Mapping[str, Tensor] | None = None,
) -> tuple[Tensor, Call | None]:
    """Run `block` on `hidden` until the module `input_of` is called (its hidden input) or `output_of` has
    run (its output); `replace` swaps modules' outputs on the way. Returns the tensor and, for `input_of`,
    how the module was called."""
    if (input_of is None) == (output_of is None):
        raise ValueError("give exactly one of input_of and output_of")
    found: dict[str, Any] = {}
    handles = []

    def take_input(_module: nn.Module, a: tuple[Any, ...], k: dict[str, Any]) -> None:
        found["value"] = _hidden_of(a, k).detach()
        found["call"] = Call.record(a, k)
        raise _Stop

    def take_output(_module: nn.Module, _inputs: Any, output: Any) -> None:
        found["value"] = first_tensor(output).detach()
        raise _Stop

    try:
        for name, value in (replace or {}).items():
            handles.append(
                block.get_submodule(name).register_forward_hook(
                    lambda _m, _i, output, v=value: _with_first(output, v)
                )
            )
        if input_of is not None:
            handles.append(
                block.get_submodule(input_of).register_forward_pre_hook(take_input, with_kwargs=True)
            )
        else:
            handles.append(block.get_submodule(output_of).register_forward_hook(take_output))
        with contextlib.suppress(_Stop):
            block(hidden, *args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    if "value" not in found:
        raise SemisparseError(
            f"{type(block).__name__} never called {input_of or output_of}: this block is not supported, "
            "use `granularity` block"
        )
    return found["value"], found.get("call")


def run_sub_block(block: nn.Module, sub: SubBlock, hidden: Tensor, call: Call | None) -> Tensor:
    """The sub-block's output for its input `hidden`, with the block's current (trainable) modules."""
    if sub.chain:
        for name in sub.chain:
            hidden = block.get_submodule(name)(hidden)
        return hidden
    module = block.get_submodule(sub.entry)
    return first_tensor(call.run(module, hidden) if call is not None else module(hidden))
