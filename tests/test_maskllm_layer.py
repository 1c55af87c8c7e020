"""The differentiable N:M mask layer: candidates, Gumbel-softmax soft masks, hard/eval modes, gradients."""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from semisparse.maskllm.candidates import candidate_count, candidate_masks, matching_candidate
from semisparse.maskllm.gumbel import (
    candidate_major,
    from_candidate_major,
    gumbel_noise,
    sample_masked_weight,
    sample_probabilities,
)
from semisparse.maskllm.layer import LearnableMaskLinear
from semisparse.nm import NMPattern

PATTERNS = [NMPattern(2, 4), NMPattern(1, 4), NMPattern(4, 8), NMPattern(2, 8)]


def make_layer(pattern=None, out=6, groups=5, seed=0):
    pattern = pattern or NMPattern(2, 4)
    torch.manual_seed(seed)
    linear = nn.Linear(groups * pattern.m, out)
    return LearnableMaskLinear.from_module(linear, pattern, torch.Generator().manual_seed(seed)), linear


def decisive_logits(layer, gap=0.1):
    """Logits whose argmax leads the rest by `gap` in every group, so sampling at high κ cannot flip it."""
    with torch.no_grad():
        chosen = torch.randint(0, layer.logits.shape[-1], layer.logits.shape[:2])
        layer.logits.add_(gap * F.one_hot(chosen, layer.logits.shape[-1]))
    return chosen


@pytest.mark.parametrize("pattern", PATTERNS, ids=str)
def test_candidates_are_exactly_all_n_of_m_masks_in_lexicographic_order(pattern):
    rows = candidate_masks(pattern)
    assert rows.shape == (math.comb(pattern.m, pattern.n), pattern.m) == (candidate_count(pattern), pattern.m)
    expected = [
        tuple(int(i in kept) for i in range(pattern.m))
        for kept in itertools.combinations(range(pattern.m), pattern.n)
    ]
    assert [tuple(int(v) for v in row) for row in rows] == expected
    assert len(set(expected)) == len(expected)


def test_two_four_candidates_spelled_out():
    assert candidate_masks(NMPattern(2, 4)).tolist() == [
        [1, 1, 0, 0],
        [1, 0, 1, 0],
        [1, 0, 0, 1],
        [0, 1, 1, 0],
        [0, 1, 0, 1],
        [0, 0, 1, 1],
    ]


def test_matching_candidate_finds_each_candidate():
    pattern = NMPattern(2, 4)
    rows = candidate_masks(pattern)
    mask = rows[torch.tensor([[5, 0, 3], [1, 2, 4]])].reshape(2, 12) > 0
    assert matching_candidate(mask, rows).tolist() == [[5, 0, 3], [1, 2, 4]]


def test_logits_are_fp32_seeded_small_normals_and_weight_is_frozen():
    layer, linear = make_layer(out=64, groups=64)
    again, _ = make_layer(out=64, groups=64)
    assert layer.logits.dtype == torch.float32 and layer.logits.shape == (64, 64, 6)
    assert torch.equal(layer.logits, again.logits)
    assert abs(layer.logits.std().item() - 0.01) < 0.001 and abs(layer.logits.mean().item()) < 0.001
    assert not layer.weight.requires_grad and torch.equal(layer.weight, linear.weight)
    bf16 = LearnableMaskLinear(linear.weight.bfloat16(), None, NMPattern(2, 4))
    assert bf16.logits.dtype == torch.float32


@pytest.mark.parametrize("pattern", PATTERNS, ids=str)
@pytest.mark.parametrize(("tau", "kappa"), [(4.0, 1e2), (0.05, 5e2), (1.0, 1.0)])
def test_soft_masks_lie_in_unit_interval_and_sum_to_n_per_group(pattern, tau, kappa):
    layer, _ = make_layer(pattern)
    layer.tau, layer.kappa = tau, kappa
    mask = layer.sample_mask()
    assert mask.shape == layer.weight.shape and mask.dtype == torch.float32
    assert mask.min() >= 0 and mask.max() <= 1 + 1e-6
    sums = mask.reshape(mask.shape[0], -1, pattern.m).sum(-1)
    torch.testing.assert_close(sums, torch.full_like(sums, float(pattern.n)))
    probs = sample_probabilities(layer.logits, tau, kappa)
    assert probs.min() >= 0
    torch.testing.assert_close(probs.sum(0), torch.ones(probs.shape[1]))


def test_soft_mask_follows_the_gumbel_softmax_formula():
    layer, _ = make_layer()
    layer.tau, layer.kappa = 0.7, 30.0
    torch.manual_seed(123)
    mask = layer.sample_mask()
    torch.manual_seed(123)
    noise = from_candidate_major(gumbel_noise(candidate_major(layer.logits)), layer.logits.shape)
    y = torch.softmax((noise + 30.0 * layer.logits.detach()) / 0.7, dim=-1)
    expected = (y @ candidate_masks(NMPattern(2, 4))).reshape(layer.weight.shape)
    torch.testing.assert_close(mask.detach(), expected)


def test_low_temperature_and_high_kappa_approach_the_argmax_mask():
    layer, _ = make_layer(out=16, groups=16)
    decisive_logits(layer)
    target = layer.argmax_mask().float()
    deviations = []
    for tau, kappa in [(4.0, 1e2), (1.0, 2e2), (0.05, 5e2)]:
        layer.tau, layer.kappa = tau, kappa
        torch.manual_seed(0)
        deviations.append((layer.sample_mask().detach() - target).abs().max().item())
    assert deviations[0] > 0.1
    assert deviations == sorted(deviations, reverse=True)
    assert deviations[-1] < 1e-6


def test_gradient_reaches_the_logits_and_not_the_weights():
    layer, _ = make_layer()
    layer.train()
    before = layer.weight.detach().clone()
    out = layer(torch.randn(3, 7, layer.in_features))
    out.square().sum().backward()
    assert layer.logits.grad is not None and layer.logits.grad.abs().sum() > 0
    assert layer.weight.grad is None and layer.bias.grad is None
    assert torch.equal(layer.weight, before)


def test_training_forward_uses_the_sampled_soft_mask():
    layer, linear = make_layer()
    layer.train()
    x = torch.randn(2, layer.in_features)
    torch.manual_seed(5)
    out = layer(x)
    torch.manual_seed(5)
    mask = layer.sample_mask()
    torch.testing.assert_close(out, F.linear(x, linear.weight * mask, linear.bias))
    torch.testing.assert_close(layer.last_regulariser, (linear.weight.detach() * mask).square().sum())


def test_hard_mode_forwards_exactly_one_candidate_with_a_soft_gradient():
    layer, _ = make_layer()
    layer.hard, layer.tau = True, 4.0
    layer.train()
    torch.manual_seed(2)
    mask = layer.sample_mask()
    torch.manual_seed(2)
    chosen = from_candidate_major(sample_probabilities(layer.logits, 4.0, layer.kappa), layer.logits.shape)
    groups = mask.detach().reshape(mask.shape[0], -1, 4)
    rows = candidate_masks(NMPattern(2, 4))
    assert torch.equal(groups, rows[chosen.argmax(-1)])
    x = torch.randn(4, layer.in_features)
    layer(x).sum().backward()
    assert layer.logits.grad is not None and layer.logits.grad.abs().sum() > 0


def test_eval_mode_uses_the_argmax_candidate_deterministically():
    layer, linear = make_layer()
    chosen = decisive_logits(layer)
    layer.eval()
    rows = candidate_masks(NMPattern(2, 4))
    expected_mask = rows[chosen].reshape(layer.weight.shape)
    assert torch.equal(layer.argmax_mask(), expected_mask > 0)
    x = torch.randn(3, layer.in_features)
    out = layer(x)
    assert torch.equal(out, layer(x))
    torch.testing.assert_close(out, F.linear(x, linear.weight * expected_mask, linear.bias))


def test_conv1d_is_wrapped_in_linear_layout():
    torch.manual_seed(0)
    conv = Conv1D(6, 8)  # nf=6 outputs, nx=8 inputs: weight [8, 6]
    layer = LearnableMaskLinear.from_module(conv, NMPattern(2, 4))
    assert layer.weight.shape == (6, 8) and layer.source == "conv1d"
    layer.eval()
    x = torch.randn(2, 3, 8)
    masked = Conv1D(6, 8)
    with torch.no_grad():
        masked.weight.copy_(conv.weight * layer.argmax_mask().t())
        masked.bias.copy_(conv.bias)
    torch.testing.assert_close(layer(x), masked(x))


def test_input_size_must_be_a_multiple_of_m():
    with pytest.raises(ValueError, match="multiple of M=4"):
        LearnableMaskLinear(torch.zeros(2, 6), None, NMPattern(2, 4))


def test_joint_mode_gives_the_weights_the_dense_straight_through_gradient():
    layer, linear = make_layer()
    layer.weight.requires_grad_(True)
    layer.train()
    x = torch.randn(5, layer.in_features)
    torch.manual_seed(1)
    out = layer(x)
    torch.manual_seed(1)
    mask = layer.sample_mask()
    torch.testing.assert_close(out, F.linear(x, linear.weight * mask, linear.bias))
    upstream = torch.randn_like(out)
    out.backward(upstream)
    torch.testing.assert_close(layer.weight.grad, upstream.T @ x)
    assert layer.logits.grad is not None and layer.logits.grad.abs().sum() > 0


def test_gumbel_noise_has_the_gumbel_distribution():
    torch.manual_seed(0)
    noise = gumbel_noise(torch.empty(200_000))
    assert torch.isfinite(noise).all()
    # Standard Gumbel: mean = Euler-Mascheroni constant, variance = pi^2 / 6, median = -log(log 2).
    assert noise.mean().item() == pytest.approx(0.5772, abs=0.01)
    assert noise.var().item() == pytest.approx(math.pi**2 / 6, rel=0.02)
    assert noise.median().item() == pytest.approx(-math.log(math.log(2)), abs=0.01)


def naive_masked_weight(weight, logits, candidates, tau, kappa, hard, noise):
    """The Gumbel-softmax masked weight written out with autograd ops, as a reference for the fused one."""
    probs = torch.softmax((noise + kappa * logits) / tau, dim=-1)
    chosen = probs
    if hard:
        one_hot = F.one_hot(probs.argmax(-1), probs.shape[-1]).float()
        chosen = one_hot + probs - probs.detach()
    masked = weight * (chosen @ candidates).reshape(weight.shape)
    return masked, masked.square().sum(), probs.amax(-1).mean()


@pytest.mark.parametrize("pattern", [NMPattern(2, 4), NMPattern(1, 4), NMPattern(2, 8)], ids=str)
@pytest.mark.parametrize("hard", [False, True], ids=["soft", "hard"])
def test_fused_sample_matches_autograd_through_the_formula(pattern, hard):
    layer, _ = make_layer(pattern, out=5, groups=7)
    weight = layer.weight.detach().clone().requires_grad_(True)
    candidates = candidate_masks(pattern)
    torch.manual_seed(9)
    masked, reg, max_probability = sample_masked_weight(weight, layer.logits, candidates, 0.8, 3.0, hard)
    torch.manual_seed(9)
    noise = from_candidate_major(gumbel_noise(candidate_major(layer.logits)), layer.logits.shape)
    logits = layer.logits.detach().clone().requires_grad_(True)
    frozen = weight.detach()
    expected = naive_masked_weight(frozen, logits, candidates, 0.8, 3.0, hard, noise)
    torch.testing.assert_close(masked, expected[0])
    torch.testing.assert_close(reg, expected[1])
    torch.testing.assert_close(max_probability, expected[2])

    upstream = torch.randn_like(masked)
    ((masked * upstream).sum() - 0.37 * reg).backward()
    ((expected[0] * upstream).sum() - 0.37 * expected[1]).backward()
    torch.testing.assert_close(layer.logits.grad, logits.grad)
    torch.testing.assert_close(weight.grad, upstream)


def test_fused_sample_runs_in_fp32_under_autocast_and_keeps_the_weight_dtype():
    layer, _ = make_layer(out=4, groups=3)
    weight = layer.weight.detach().bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        masked, reg, _ = sample_masked_weight(weight, layer.logits, layer.candidates, 1.0, 1.0)
    assert masked.dtype == torch.bfloat16 and reg.dtype == torch.float32
    sums = (masked.float() / weight.float()).reshape(4, 3, 4).sum(-1)
    torch.testing.assert_close(sums, torch.full_like(sums, 2.0), atol=2e-2, rtol=0)
    reg.backward()
    assert layer.logits.grad is not None and layer.logits.grad.dtype == torch.float32
