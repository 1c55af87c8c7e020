"""The registry: facts per technique, one-line lookups, and a pruner registered in this file alone that
`prune`, the CLI, a recipe and AST's `init` all accept without any other module being touched."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from click.testing import CliRunner
from conftest import make_tiny_model
from torch import Tensor, nn

from semisparse import Recipe, nm, registry
from semisparse.cli import main
from semisparse.errors import SemisparseError
from semisparse.methods.ast import ASTConfig, ASTMethod
from semisparse.models import load_model
from semisparse.modules import find_targets, set_weight_matrix, weight_matrix
from semisparse.pruning import PrunerConfig, prune, pruner_config
from semisparse.registry import register
from semisparse.settings import setting


@dataclass
class KeepFirstConfig(PrunerConfig):
    """Keep the first N of every M inputs: a pruner nobody would use, easy to recognise."""

    owner: ClassVar[str] = "keep-first"

    scale: float = setting(1.0, "factor applied to the kept weights", above=0)


class KeepFirst:
    def __init__(self, module: nn.Module, config: KeepFirstConfig) -> None:
        self.module, self.config = module, config

    def add_batch(self, inp: Tensor) -> None:
        return None

    def prune(self) -> None:
        pattern = self.config.nm_pattern
        weight = weight_matrix(self.module)
        keep = torch.zeros(pattern.m, dtype=torch.bool)
        keep[: pattern.n] = True
        mask = keep.repeat(weight.shape[1] // pattern.m).expand_as(weight)
        set_weight_matrix(
            self.module, torch.where(mask, weight * self.config.scale, torch.zeros_like(weight))
        )


def keep_first(name: str, module: nn.Module, config: KeepFirstConfig) -> KeepFirst:
    return KeepFirst(module, config)


@pytest.fixture(autouse=True, scope="module")
def toy_pruner_only_here() -> Iterator[None]:
    """Register the toy pruner while this file's tests run: pytest imports every test file before it runs
    any, so registering at import would show it to the other files' tests too."""
    register(
        "pruner",
        "keep-first",
        KeepFirstConfig,
        summary="keep the first N of every M",
        updates_kept_weights=True,
    )(keep_first)
    yield
    registry.unregister("pruner", "keep-first")


def kept_first(model: nn.Module) -> bool:
    for module in find_targets(model).values():
        groups = weight_matrix(module).reshape(weight_matrix(module).shape[0], -1, 4)
        if bool((groups[..., 2:] != 0).any()) or not nm.is_nm(weight_matrix(module), 2, 4):
            return False
    return True


def test_the_toy_pruner_works_through_prune() -> None:
    model = make_tiny_model("llama")
    prune(model, pruner_config("keep-first", pattern="2:4", scale=2.0), progress=False)
    assert kept_first(model)


def test_the_toy_pruner_works_from_the_command_line(dense_dir, tmp_path) -> None:
    out = tmp_path / "pruned"
    result = CliRunner().invoke(
        main,
        ["prune", str(dense_dir), "--method", "keep-first", "--set", "scale=0.5", "-o", str(out), "--quiet"],
    )
    assert result.exit_code == 0, result.output
    assert kept_first(load_model(str(out)))


def test_the_toy_pruner_works_in_a_recipe(dense_dir, tmp_path) -> None:
    recipe = Recipe.from_mapping({"stages": [{"prune": {"method": "keep-first", "pattern": "2:4"}}]})
    result = recipe.run(model=str(dense_dir), out=tmp_path / "run", progress=False)
    assert kept_first(load_model(str(result.final_model)))


def test_the_toy_pruner_is_an_ast_init(dense_dir, calib_file) -> None:
    config = ASTConfig(init="keep-first", calibration=str(calib_file), mask_update_every=0)
    method = ASTMethod.from_pretrained(str(dense_dir), config, 2, "cpu", progress=False)
    for layer in method.layers.values():
        keep = layer.mask.reshape(layer.mask.shape[0], -1, 4)
        assert bool(keep[..., :2].all()) and not bool(keep[..., 2:].any())
    # It declares that it updates the kept weights, so SLoRB starts from zeros as after SparseGPT.
    assert ASTConfig(init="keep-first", slorb=True).slorb_init == "zeros"
    assert ASTConfig(init="magnitude", slorb=True).slorb_init == "mean"


def test_lookups_name_what_exists() -> None:
    with pytest.raises(SemisparseError, match=r"unknown pruner 'owl': use one of magnitude, .*keep-first"):
        registry.lookup("pruner", "owl")
    with pytest.raises(SemisparseError, match="not a registered pruner config"):
        registry.for_config(object(), "pruner")


def test_a_name_is_registered_once() -> None:
    with pytest.raises(ValueError, match="already registered"):
        register("pruner", "keep-first", KeepFirstConfig)(lambda *args: None)


def test_unregistering_an_unknown_name_is_an_error() -> None:
    with pytest.raises(SemisparseError, match="no pruner named 'owl'"):
        registry.unregister("pruner", "owl")
