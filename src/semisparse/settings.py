"""One validation helper for every technique's config: typed dataclasses checked in one place.

A config is a dataclass deriving from `Settings` whose fields are declared with `setting(default, help)`.
On construction every field is coerced once to its declared type (so YAML's `"1e-4"`, a `--set k=v`
string and a Python float all end up the same), checked against its bounds and choices, and then the
class's own `check()` runs the cross-field rules. `from_mapping` also rejects unknown keys, naming the
valid ones; `describe` lists the settings with type, default and meaning for `semisparse settings`.

Error messages name parameters in backquotes (`` `seqlen` ``); the CLI turns those into its flags.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Self

from semisparse.errors import SemisparseError

_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0")
_NONE = ("none", "null", "~", "")


def setting(
    default: Any,
    help: str,
    *,
    minimum: float | None = None,
    above: float | None = None,
) -> Any:
    """A config field with its one-line meaning; `minimum` is inclusive, `above` exclusive."""
    metadata = {"help": help, "minimum": minimum, "above": above}
    if isinstance(default, list | dict):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def _type_name(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        return " | ".join(str(arg) for arg in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(arg) for arg in args)
    if origin in (list, tuple):
        inner = ", ".join(_type_name(arg) for arg in args if arg is not Ellipsis)
        return f"{origin.__name__}[{inner}]"
    if hint is type(None):
        return "None"
    return getattr(hint, "__name__", str(hint))


class _Invalid(Exception):
    """A value that does not fit its declared type; `expected` says what would."""

    def __init__(self, expected: str) -> None:
        super().__init__(expected)
        self.expected = expected


def _to_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in (*_TRUE, *_FALSE):
        return value.strip().lower() in _TRUE
    raise _Invalid("true or false")


def _to_float(value: Any) -> float:
    if isinstance(value, bool):
        raise _Invalid("a number")
    try:
        number = float(value.strip()) if isinstance(value, str) else float(value)
    except (TypeError, ValueError, OverflowError):
        raise _Invalid("a number") from None
    if not isinstance(value, int | float | str) or not math.isfinite(number):
        raise _Invalid("a finite number")
    return number


def _to_int(value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    number = _to_float(value) if isinstance(value, str | float) else None
    if number is None or not number.is_integer():
        raise _Invalid("a whole number")
    return int(number)


def coerce(value: Any, hint: Any) -> Any:
    """`value` as the type `hint` declares (see the module docstring); raises `_Invalid` if it is not."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        empty = value is None or (isinstance(value, str) and value.strip().lower() in _NONE)
        if empty and type(None) in args:
            return None
        inner = [arg for arg in args if arg is not type(None)]
        errors = []
        for arg in inner:
            try:
                return coerce(value, arg)
            except _Invalid as err:
                errors.append(err.expected)
        raise _Invalid(" or ".join(errors + (["None"] if type(None) in args else [])))
    if origin is Literal:
        for arg in args:
            if (value == arg and type(value) is type(arg)) or str(value).strip() == str(arg):
                return arg
        raise _Invalid("one of " + ", ".join(str(arg) for arg in args))
    if hint is bool:
        return _to_bool(value)
    if hint is int:
        return _to_int(value)
    if hint is float:
        return _to_float(value)
    if hint is str:
        if not isinstance(value, str):
            raise _Invalid("a string")
        return value
    if origin is list:
        items = (
            [part.strip() for part in value.split(",") if part.strip()] if isinstance(value, str) else value
        )
        if not isinstance(items, list | tuple):
            raise _Invalid(f"a list of {_type_name(args[0])}")
        return [coerce(item, args[0]) for item in items]
    if origin is tuple:
        items = [part.strip() for part in value.split(",")] if isinstance(value, str) else value
        if not isinstance(items, list | tuple) or len(items) != len(args):
            raise _Invalid(f"{len(args)} values, e.g. [{', '.join('…' for _ in args)}]")
        return tuple(coerce(item, arg) for item, arg in zip(items, args, strict=True))
    return value


@dataclass
class Settings:
    """Base of every technique config: fields coerced and checked on construction, then `check()`."""

    owner: ClassVar[str] = "settings"

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for item in dataclasses.fields(self):
            value = getattr(self, item.name)
            try:
                value = coerce(value, hints[item.name])
            except _Invalid as err:
                raise SemisparseError(
                    f"{self.owner} setting `{item.name}`={value!r} must be {err.expected}"
                ) from None
            minimum, above = item.metadata.get("minimum"), item.metadata.get("above")
            if isinstance(value, int | float) and not isinstance(value, bool):
                if minimum is not None and value < minimum:
                    raise SemisparseError(
                        f"{self.owner} setting `{item.name}`={value!r} must be >= {minimum}"
                    )
                if above is not None and value <= above:
                    raise SemisparseError(f"{self.owner} setting `{item.name}`={value!r} must be > {above}")
            setattr(self, item.name, value)
        self.check()

    def check(self) -> None:
        """Cross-field rules of a config; raise `SemisparseError` naming the setting to change."""

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> Self:
        """The config from a recipe section or `--set` pairs; unknown keys name the valid ones."""
        if not isinstance(values, Mapping):
            raise SemisparseError(
                f"{cls.owner} settings must be a mapping of name: value, got {type(values).__name__}"
            )
        known = [item.name for item in dataclasses.fields(cls)]
        unknown = sorted(str(key) for key in values if str(key).replace("-", "_") not in known)
        if unknown:
            raise SemisparseError(
                f"unknown {cls.owner} setting(s) {', '.join(unknown)}; valid: {', '.join(known) or 'none'}"
            )
        return cls(**{str(key).replace("-", "_"): value for key, value in values.items()})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class SettingInfo:
    """One row of `semisparse settings`: a config field's name, type, default and meaning."""

    name: str
    type: str
    default: Any
    help: str


def describe(cls: type) -> list[SettingInfo]:
    """The settings of a config class, for help texts generated from the dataclass."""
    hints = typing.get_type_hints(cls)
    rows = []
    for item in dataclasses.fields(cls):
        if item.default is not dataclasses.MISSING:
            default = item.default
        elif item.default_factory is not dataclasses.MISSING:
            default = item.default_factory()
        else:
            default = "(required)"
        rows.append(
            SettingInfo(item.name, _type_name(hints[item.name]), default, item.metadata.get("help", ""))
        )
    return rows


def parse_assignments(assignments: typing.Iterable[str]) -> dict[str, str]:
    """`key=value` strings (from `--set`) as a mapping; values stay strings for `Settings` to coerce."""
    values = {}
    for assignment in assignments:
        key, sep, value = assignment.partition("=")
        if not sep or not key.strip():
            raise SemisparseError(f"setting {assignment!r} is not key=value; write e.g. pattern=2:4")
        values[key.strip().replace("-", "_")] = value
    return values
