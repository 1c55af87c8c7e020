"""SparseGPT per layer: agreement with a naive OBS implementation, reconstruction quality against
magnitude and Wanda, the running Hessian, dead inputs, and a non-positive-definite Hessian."""

from __future__ import annotations

import pytest
import torch
from conftest import VOCAB_SIZE, make_tiny_model
from torch import nn

from semisparse import nm
from semisparse.errors import SemisparseError
from semisparse.modules import find_targets, weight_matrix
from semisparse.nm import NMPattern
from semisparse.pruning import SparseGPTConfig, prune
from semisparse.pruning.magnitude import magnitude_mask
from semisparse.pruning.sparsegpt import SparseGPTPruner, sparsegpt_prune_weight
from semisparse.pruning.wanda import wanda_mask


def correlated_inputs(tokens: int, features: int, seed: int = 0) -> torch.Tensor:
    """`Z @ A` with a random mixing `A`: correlated features, so the Hessian is far from diagonal."""
    gen = torch.Generator().manual_seed(seed)
    mixing = torch.randn(features, features, generator=gen)
    return torch.randn(tokens, features, generator=gen) @ mixing


def hessian_of(x: torch.Tensor) -> torch.Tensor:
    return 2.0 / x.shape[0] * x.t() @ x


def naive_sparsegpt(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    pattern: NMPattern | None,
    sparsity: float | None,
    blocksize: int,
    percdamp: float,
) -> torch.Tensor:
    """Column-by-column OBS with explicit inverses of the remaining columns' Hessian (float64, no Cholesky,
    no lazy block updates): the textbook procedure that SparseGPT computes efficiently."""
    w = weight.double().clone()
    h = hessian.double().clone()
    dead = h.diagonal() == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    h += percdamp * h.diagonal().mean() * torch.eye(h.shape[0], dtype=torch.float64)
    cols = w.shape[1]
    remaining_inverse = [torch.linalg.inv(h[j:, j:])[0] for j in range(cols)]
    d2 = torch.stack([row[0] for row in remaining_inverse])
    keep = torch.ones_like(w, dtype=torch.bool)
    for j in range(cols):
        if pattern is not None and j % pattern.m == 0:
            saliency = w[:, j : j + pattern.m] ** 2 / d2[j : j + pattern.m]
            for r in range(w.shape[0]):
                for c in sorted(range(pattern.m), key=lambda c: saliency[r, c].item())[
                    : pattern.m - pattern.n
                ]:
                    keep[r, j + c] = False
        if pattern is None and j % blocksize == 0:
            saliency = w[:, j : j + blocksize] ** 2 / d2[j : j + blocksize]
            order = sorted(range(saliency.numel()), key=lambda i: saliency.flatten()[i].item())
            block_keep = torch.ones(saliency.numel(), dtype=torch.bool)
            block_keep[order[: int(saliency.numel() * sparsity)]] = False
            keep[:, j : j + blocksize] = block_keep.view(saliency.shape)
        pruned = ~keep[:, j]
        row = remaining_inverse[j]
        w[pruned, j:] -= (w[pruned, j] / row[0]).unsqueeze(1) * row.unsqueeze(0)
        w[pruned, j] = 0
    return w


@pytest.mark.parametrize(
    "pattern, sparsity, blocksize",
    [(NMPattern(2, 4), None, 8), (NMPattern(1, 4), None, 16), (NMPattern(4, 8), None, 128), (None, 0.5, 8)],
)
def test_matches_naive_obs(pattern: NMPattern | None, sparsity: float | None, blocksize: int) -> None:
    torch.manual_seed(0)
    weight = torch.randn(12, 32)
    hessian = hessian_of(correlated_inputs(256, 32))
    expected = naive_sparsegpt(weight, hessian, pattern, sparsity, blocksize, 0.01)
    got = sparsegpt_prune_weight(weight, hessian, pattern, sparsity, blocksize=blocksize, percdamp=0.01)
    assert torch.equal(got == 0, expected == 0)
    assert torch.allclose(got.double(), expected, rtol=1e-3, atol=1e-4)
    kept = got != 0
    assert not torch.allclose(got[kept], weight[kept]), "SparseGPT must update the kept weights"


def test_lazy_block_updates_do_not_change_an_nm_result() -> None:
    torch.manual_seed(1)
    weight = torch.randn(16, 64)
    hessian = hessian_of(correlated_inputs(512, 64))
    small = sparsegpt_prune_weight(weight, hessian, NMPattern(2, 4), None, blocksize=8)
    whole = sparsegpt_prune_weight(weight, hessian, NMPattern(2, 4), None, blocksize=128)
    assert torch.equal(small == 0, whole == 0)
    assert torch.allclose(small, whole, rtol=1e-4, atol=1e-5)


def reconstruction_error(x: torch.Tensor, weight: torch.Tensor, pruned: torch.Tensor) -> float:
    return (x @ weight.t() - x @ pruned.t()).square().sum().item()


@pytest.mark.parametrize("pattern", [NMPattern(2, 4), NMPattern(4, 8)])
def test_reconstructs_the_layer_output_better_than_magnitude_and_wanda(pattern: NMPattern) -> None:
    torch.manual_seed(0)
    layer = nn.Linear(64, 32)
    x = correlated_inputs(1024, 64)
    weight = layer.weight.detach().clone()

    pruner = SparseGPTPruner(layer, pattern, None)
    for chunk in x.view(8, 128, 64):
        pruner.add_batch(chunk.unsqueeze(0))
    pruner.prune()
    sparsegpt_error = reconstruction_error(x, weight, layer.weight.detach())

    magnitude_error = reconstruction_error(x, weight, weight * magnitude_mask(weight, pattern, None))
    wanda_keep = wanda_mask(weight, x.square().sum(0), pattern, None)
    wanda_error = reconstruction_error(x, weight, weight * wanda_keep)
    assert sparsegpt_error < 0.8 * magnitude_error
    assert sparsegpt_error < 0.8 * wanda_error
    assert nm.is_nm(layer.weight, pattern.n, pattern.m)


def test_hessian_is_the_running_average_over_samples() -> None:
    layer = nn.Linear(8, 4)
    batches = [torch.randn(2, 5, 8), torch.randn(1, 3, 8), torch.randn(3, 4, 8)]
    pruner = SparseGPTPruner(layer, NMPattern(2, 4), None)
    for batch in batches:
        pruner.add_batch(batch)
    tokens = torch.cat([b.reshape(-1, 8) for b in batches])
    assert pruner.n_samples == 6
    assert torch.allclose(pruner.hessian, 2.0 / 6 * tokens.t() @ tokens, rtol=1e-5, atol=1e-6)


def test_dead_input_features_get_zero_weight() -> None:
    torch.manual_seed(0)
    layer = nn.Linear(32, 8)
    x = correlated_inputs(256, 32)
    x[:, [3, 17]] = 0
    pruner = SparseGPTPruner(layer, NMPattern(2, 4), None)
    pruner.add_batch(x.unsqueeze(0))
    pruner.prune()
    weight = layer.weight.detach()
    assert torch.isfinite(weight).all()
    assert (weight[:, [3, 17]] == 0).all()
    assert nm.is_nm(weight, 2, 4)
    assert (weight != 0).sum() == 8 * 32 // 2


def test_singular_hessian_without_dampening_is_a_user_error() -> None:
    torch.manual_seed(0)
    weight = torch.randn(4, 32)
    x = torch.randn(4, 32)
    x[:, 1] = x[:, 0]
    with pytest.raises(SemisparseError, match="percdamp"):
        sparsegpt_prune_weight(weight, hessian_of(x), NMPattern(2, 4), None, percdamp=0.0)


def test_half_precision_model_is_pruned_in_its_own_dtype() -> None:
    model = make_tiny_model("llama").to(torch.bfloat16)
    ids = torch.randint(0, VOCAB_SIZE, (4, 16), generator=torch.Generator().manual_seed(0))
    prune(model, SparseGPTConfig(pattern="2:4"), calibration_ids=ids, progress=False)
    for name, module in find_targets(model).items():
        weight = weight_matrix(module)
        assert weight.dtype == torch.bfloat16, name
        assert nm.is_nm(weight, 2, 4), name
        assert nm.sparsity(weight) == pytest.approx(0.5), name
    assert torch.isfinite(model(input_ids=ids).logits.float()).all()
