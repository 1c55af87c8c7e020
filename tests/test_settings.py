"""The one validation helper: types coerced once, bounds and choices checked, unknown keys named."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import pytest

from semisparse.errors import SemisparseError
from semisparse.settings import Settings, describe, parse_assignments, setting


@dataclass
class Example(Settings):
    owner: ClassVar[str] = "example"

    rate: float = setting(1e-4, "a rate", above=0)
    steps: int = setting(10, "a count", minimum=0)
    flag: bool = setting(False, "a switch")
    name: str = setting("c4", "a name")
    limit: int | None = setting(None, "optional count", minimum=1)
    mode: Literal["fast", "exact"] = setting("fast", "a choice")
    bits: Literal[4, 8] = setting(4, "a numeric choice")
    layers: list[str] = setting([], "globs")
    betas: tuple[float, float] = setting((0.9, 0.95), "a pair")

    def check(self) -> None:
        if self.flag and self.steps == 0:
            raise SemisparseError("`flag` needs `steps` > 0")


def test_strings_from_yaml_or_the_command_line_become_the_declared_types() -> None:
    config = Example.from_mapping(
        {
            "rate": "1e-3",
            "steps": "1e2",
            "flag": "yes",
            "limit": "none",
            "mode": "exact",
            "bits": "8",
            "layers": "a.*, b.*",
            "betas": "0.8,0.9",
        }
    )
    assert config.rate == 1e-3 and config.steps == 100 and config.flag is True
    assert config.limit is None and config.mode == "exact" and config.bits == 8
    assert config.layers == ["a.*", "b.*"] and config.betas == (0.8, 0.9)


@pytest.mark.parametrize(
    "values, message",
    [
        ({"rate": float("nan")}, "`rate`=nan must be a finite number"),
        ({"rate": float("inf")}, "finite"),
        ({"rate": "1e400"}, "finite"),
        ({"rate": 0}, "`rate`=0.0 must be > 0"),
        ({"steps": 2.5}, "`steps`=2.5 must be a whole number"),
        ({"steps": True}, "whole number"),
        ({"steps": -1}, ">= 0"),
        ({"flag": "maybe"}, "true or false"),
        ({"name": 7}, "`name`=7 must be a string"),
        ({"limit": 0}, ">= 1"),
        ({"mode": "slow"}, "one of fast, exact"),
        ({"bits": 3}, "one of 4, 8"),
        ({"betas": 5}, "2 values"),
        ({"layers": 3}, "list of str"),
        ({"flag": True, "steps": 0}, "`flag` needs `steps`"),
    ],
)
def test_bad_values_are_one_line_errors_naming_the_setting(values: dict, message: str) -> None:
    with pytest.raises(SemisparseError, match=message) as caught:
        Example.from_mapping(values)
    assert "\n" not in str(caught.value)


def test_construction_from_python_is_validated_too() -> None:
    with pytest.raises(SemisparseError, match="example setting `steps`"):
        Example(steps="many")


def test_unknown_keys_list_the_valid_ones() -> None:
    with pytest.raises(
        SemisparseError, match=r"unknown example setting\(s\) speed; valid: rate, steps, flag"
    ):
        Example.from_mapping({"speed": 1})


def test_dashes_in_keys_are_underscores() -> None:
    assert Example.from_mapping(parse_assignments(["rate=0.5"])).rate == 0.5


def test_describe_lists_type_default_and_meaning() -> None:
    rows = {row.name: row for row in describe(Example)}
    assert rows["rate"].type == "float" and rows["rate"].default == 1e-4 and rows["rate"].help == "a rate"
    assert rows["mode"].type == "fast | exact"
    assert rows["limit"].type == "int | None"
    assert rows["layers"].default == []


def test_assignments_must_be_key_value() -> None:
    with pytest.raises(SemisparseError, match="not key=value"):
        parse_assignments(["rate"])
