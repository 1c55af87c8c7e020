"""One registry of techniques: each is a typed config bound to its implementation, with its facts.

A technique registers itself where it is defined, in one call:

    @register("pruner", "sparsegpt", SparseGPTConfig, needs_calibration=True, updates_kept_weights=True)
    def sparsegpt_layer(name, module, config): ...

Everything that has to know a fact about a technique (does it need calibration data, does it already
compensate the kept weights, which patterns it supports) asks its entry, never compares names. The
built-in techniques live in the packages named in `_BUILTIN`, imported the first time a kind is looked up,
so a name given on the command line or in a recipe finds them without this module importing them.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from semisparse.errors import SemisparseError

KINDS = ("pruner", "quantizer", "trainer", "stage")
# Where the built-in techniques of each kind register themselves.
_BUILTIN: dict[str, tuple[str, ...]] = {
    "pruner": ("semisparse.pruning",),
    "quantizer": ("semisparse.quantization",),
    "trainer": ("semisparse.methods",),
    "stage": ("semisparse.jobs.stages",),
}

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class Technique:
    """A registered technique: its kind and name, its config class, its implementation, and its facts.

    `needs_calibration`: it reads calibration data. `updates_kept_weights`: it changes the weights it keeps
    (SparseGPT's compensation), so a later stage must not restore the dense values. `patterns`: the
    sparsity kinds it supports, "nm" and/or "unstructured".
    """

    kind: str
    name: str
    config: type
    implementation: Any
    summary: str = ""
    needs_calibration: bool = False
    updates_kept_weights: bool = False
    patterns: tuple[str, ...] = ("nm", "unstructured")


_ENTRIES: dict[tuple[str, str], Technique] = {}
_LOADED: set[str] = set()


def register(
    kind: str,
    name: str,
    config: type,
    *,
    summary: str = "",
    needs_calibration: bool = False,
    updates_kept_weights: bool = False,
    patterns: tuple[str, ...] = ("nm", "unstructured"),
) -> Callable[[F], F]:
    """Bind `config` and the decorated implementation under `kind`/`name`; a name is registered once."""
    if kind not in KINDS:
        raise ValueError(f"unknown technique kind {kind!r}; use one of {', '.join(KINDS)}")

    def bind(implementation: F) -> F:
        existing = _ENTRIES.get((kind, name))
        if existing is not None and existing.implementation is not implementation:
            raise ValueError(f"a {kind} named {name!r} is already registered")
        doc = (implementation.__doc__ or "").strip()
        _ENTRIES[(kind, name)] = Technique(
            kind,
            name,
            config,
            implementation,
            summary or (doc.splitlines()[0] if doc else ""),
            needs_calibration,
            updates_kept_weights,
            patterns,
        )
        return implementation

    return bind


def unregister(kind: str, name: str) -> None:
    """Remove a registered technique (a plugin being unloaded, a test cleaning up after itself)."""
    if _ENTRIES.pop((kind, name), None) is None:
        raise SemisparseError(f"no {kind} named '{name}' is registered")


def _load_builtins(kind: str) -> None:
    if kind in _LOADED:
        return
    _LOADED.add(kind)
    for module in _BUILTIN.get(kind, ()):
        importlib.import_module(module)


def names(kind: str) -> list[str]:
    """The registered names of a kind, built-ins first in registration order."""
    _load_builtins(kind)
    return [name for entry_kind, name in _ENTRIES if entry_kind == kind]


def lookup(kind: str, name: str) -> Technique:
    """The entry of `name`, or a one-line error listing the names that exist."""
    _load_builtins(kind)
    entry = _ENTRIES.get((kind, name))
    if entry is None:
        raise SemisparseError(f"unknown {kind} '{name}': use one of {', '.join(names(kind))}")
    return entry


def for_config(config: Any, kind: str | None = None) -> Technique:
    """The entry whose config class is `type(config)` (the Python API passes configs, not names)."""
    for (entry_kind, _), entry in _ENTRIES.items():
        if type(config) is entry.config and (kind is None or entry_kind == kind):
            return entry
    wanted = f"a registered {kind} config" if kind else "a registered config"
    raise SemisparseError(f"{type(config).__name__} is not {wanted}: register it with semisparse.register")
