"""Mask swaps after reconstruction (`swap_masks`): the score is the second-order formula, the curvature is
the exact Gauss-Newton diagonal where the layer's output is the unit's, the pattern stays exact, and a unit
keeps swapped masks only when its loss ends lower."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_model

from semisparse import nm
from semisparse.errors import SemisparseError
from semisparse.modules import find_targets, weight_matrix
from semisparse.pruning import MagnitudeConfig, prune
from semisparse.reconstruction import ReconstructConfig, reconstruct
from semisparse.reconstruction.swaps import gradient_and_curvature, plan_swaps

PATTERN = nm.parse_pattern("2:4")


def test_a_group_swaps_its_cheapest_kept_weight_for_its_most_promising_pruned_one() -> None:
    weight = torch.tensor([[1.0, 0.0, 0.1, 0.0], [2.0, 0.0, 3.0, 0.0]])
    mask = weight != 0
    grad = torch.tensor([[0.0, 0.5, 0.0, 0.2], [0.0, 0.01, 0.0, 0.0]])
    curvature = torch.ones_like(weight)
    new_weight, new_mask = plan_swaps(weight, mask, grad, curvature, PATTERN, fraction=1.0)
    # Row 0: drop 0.1 (cost ½·0.1² = 0.005), grow position 1 (gain 0.5²/2 = 0.125) -> swap.
    assert new_mask[0].tolist() == [True, True, False, False]
    assert new_weight[0].tolist() == [1.0, 0.0, 0.0, 0.0]  # the grown weight starts at zero
    # Row 1: dropping 2.0 costs 2, growing gains 0.00005: no swap.
    assert torch.equal(new_mask[1], mask[1]) and torch.equal(new_weight[1], weight[1])
    assert torch.equal(weight, torch.tensor([[1.0, 0.0, 0.1, 0.0], [2.0, 0.0, 3.0, 0.0]]))  # untouched


def test_at_most_the_fraction_of_groups_swaps_the_best_first() -> None:
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(16, 32, generator=generator)
    mask = nm.nm_mask(weight, 2, 4)
    weight = weight * mask
    grad = torch.randn(16, 32, generator=generator) * 10
    curvature = torch.rand(16, 32, generator=generator) + 0.5
    new_weight, new_mask = plan_swaps(weight, mask, grad, curvature, PATTERN, fraction=0.25)
    assert nm.is_nm(new_weight, 2, 4)
    assert (new_mask.sum(dim=1) == 16).all()
    changed_groups = (new_mask != mask).reshape(16, 8, 4).any(dim=-1)
    assert int(changed_groups.sum()) == 32  # a quarter of the 128 groups, each gaining with these gradients
    assert ((new_mask != mask).reshape(16, 8, 4).sum(dim=-1)[changed_groups] == 2).all()  # one in, one out
    assert (new_weight[~new_mask] == 0).all()
    # The swapped groups are the ones with the most negative estimated loss change.
    h, g, w = curvature.reshape(16, 8, 4), grad.reshape(16, 8, 4), weight.reshape(16, 8, 4)
    kept = mask.reshape(16, 8, 4)
    grow = torch.where(kept, torch.inf, -g.square() / (2 * h)).min(-1).values
    drop = torch.where(kept, -g * w + 0.5 * h * w.square(), torch.inf).min(-1).values
    gain = grow + drop
    assert gain[changed_groups].max() <= gain[~changed_groups].min()


def test_curvature_is_the_exact_gauss_newton_diagonal_of_a_linear_output() -> None:
    torch.manual_seed(0)
    layer = torch.nn.Linear(8, 4, bias=False)
    inputs, targets = torch.randn(3, 50, 8), torch.randn(3, 50, 4)
    batches = [(inputs[i : i + 1], targets[i : i + 1]) for i in range(3)]
    variance = 0.7
    grads, curvature = gradient_and_curvature(
        [(layer, False)], batches, layer, variance, torch.Generator().manual_seed(0)
    )
    scale = 1 / (50 * 4 * variance)
    exact = (2 * scale * inputs.square().sum(dim=1)).mean(dim=0).expand(4, 8)
    torch.testing.assert_close(curvature[0], exact)
    weight = layer.weight.detach().clone().requires_grad_(True)
    loss = sum((inputs[i] @ weight.t() - targets[i]).square().sum() * scale for i in range(3)) / 3
    (expected,) = torch.autograd.grad(loss, weight)
    torch.testing.assert_close(grads[0], expected)
    assert not layer.weight.requires_grad


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_swapped_masks_stay_exact_and_only_lower_a_units_loss(arch: str) -> None:
    dense, sparse = make_tiny_model(arch), make_tiny_model(arch)
    prune(sparse, MagnitudeConfig(pattern="2:4"), progress=False)
    names = list(find_targets(sparse))
    ids = torch.randint(0, 250, (8, 32), generator=torch.Generator().manual_seed(0))
    config = ReconstructConfig(
        epochs=2, batch_size=4, lr=1e-3, nsamples=8, seqlen=32, swap_masks=True, swap_fraction=0.1
    )
    reports = reconstruct(dense, sparse, config, ids, names, PATTERN, progress=False)
    for name in names:
        assert nm.is_nm(weight_matrix(sparse.get_submodule(name)), 2, 4), name
    units = [unit for report in reports for unit in report["units"].values()]
    kept = [unit for unit in units if unit["mask_changed"] > 0]
    assert kept, "no unit kept a swap on this model"
    for unit in units:
        assert unit["loss_after"] <= unit["loss_without_swaps"]
        if unit["mask_changed"] == 0:
            assert unit["loss_swapped"] >= unit["loss_without_swaps"]
    assert all(0 < unit["mask_changed"] <= 0.1 / 2 for unit in kept)  # one in, one out of 4 per swap
    assert all("mask_changed" in report for report in reports)


def test_swaps_and_learned_masks_cannot_be_combined() -> None:
    with pytest.raises(SemisparseError, match="choose one"):
        ReconstructConfig(swap_masks=True, learn_mask=True).check()
    with pytest.raises(SemisparseError, match="swap_fraction"):
        ReconstructConfig(swap_masks=True, swap_fraction=1.5).check()
