"""Prior initialisation: the formula on hand-computed tensors, and one-shot masks as priors on tiny models."""

import pytest
import torch
from conftest import make_tiny_model

from semisparse import nm
from semisparse.calibration import Calibration
from semisparse.errors import SemisparseError
from semisparse.maskfiles import to_matrix_layout
from semisparse.maskllm import (
    attach_learnable_masks,
    candidate_masks,
    final_masks,
    one_shot_masks,
    prior_logits,
)
from semisparse.modules import find_targets, weight_matrix
from semisparse.nm import NMPattern
from semisparse.pruning import MagnitudeConfig, pruner_config

TWO_FOUR = NMPattern(2, 4)


def test_two_four_prior_is_plus_alpha_std_for_its_candidate_minus_for_the_complement():
    logits = torch.tensor([[[0.3, -0.1, 0.2, 0.0, 0.5, -0.4], [0.1, 0.1, -0.2, 0.3, 0.0, 0.2]]])
    # Group 0 keeps positions {0, 2} (candidate 1, complement {1, 3} = candidate 4);
    # group 1 keeps {2, 3} (candidate 5, complement {0, 1} = candidate 0).
    mask = torch.tensor([[1, 0, 1, 0, 0, 0, 1, 1]], dtype=torch.bool)
    std = logits.std().item()
    alpha = 3.0
    shifted = prior_logits(logits, mask, candidate_masks(TWO_FOUR), 2, alpha)
    step = alpha * std
    expected_shift = torch.tensor([[[0, step, 0, 0, -step, 0], [-step, 0, 0, 0, 0, step]]])
    torch.testing.assert_close(shifted - logits, expected_shift)


def test_one_four_prior_is_half_alpha_std_up_for_its_candidate_and_down_for_the_rest():
    logits = torch.tensor([[[0.02, -0.01, 0.0, 0.01]]])
    mask = torch.tensor([[0, 0, 1, 0]], dtype=torch.bool)
    step = 2.0 * logits.std().item()
    shifted = prior_logits(logits, mask, candidate_masks(NMPattern(1, 4)), 1, 2.0)
    torch.testing.assert_close(shifted - logits, torch.tensor([[[-0.5, -0.5, 0.5, -0.5]]]) * step)


def test_alpha_zero_leaves_the_logits_unchanged():
    logits = torch.randn(3, 4, 6)
    mask = nm.nm_mask(torch.randn(3, 16), 2, 4)
    shifted = prior_logits(logits, mask, candidate_masks(TWO_FOUR), 2, 0.0)
    assert torch.equal(shifted, logits) and shifted is not logits


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_argmax_after_a_strong_prior_is_the_prior_mask(arch):
    model = make_tiny_model(arch)
    prior = one_shot_masks(model, None, MagnitudeConfig(), progress=False)[0]
    attach_learnable_masks(model, TWO_FOUR, prior, alpha=20.0)
    learned = final_masks(model)
    assert set(learned) == set(prior)
    for name, mask in prior.items():
        assert torch.equal(learned[name], mask), name


def test_default_prior_strength_mostly_but_not_always_keeps_the_prior():
    model = make_tiny_model("llama")
    prior = one_shot_masks(model, None, MagnitudeConfig(), progress=False)[0]
    attach_learnable_masks(model, TWO_FOUR, prior, alpha=3.0)
    learned = final_masks(model)
    agree = sum(int(torch.equal(a, b)) for a, b in zip(learned.values(), prior.values(), strict=True))
    groups_equal = torch.cat(
        [(learned[n].reshape(-1, 4) == prior[n].reshape(-1, 4)).all(-1) for n in prior if "proj" in n]
    )
    # +3 std against noise of std sqrt(2): a few percent of groups start elsewhere, the vast majority not.
    assert 0.8 < groups_equal.float().mean().item() < 1.0
    assert agree < len(prior)


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_one_shot_masks_are_n_m_and_leave_the_weights_untouched(method, tiny_tokenizer, calib_file):
    model = make_tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calibration = Calibration(source=str(calib_file), nsamples=4, seqlen=32)
    masks, info = one_shot_masks(
        model, tiny_tokenizer, pruner_config(method, pattern="2:4"), calibration, progress=False
    )
    assert (info is None) == (method == "magnitude")
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    targets = find_targets(model)
    assert set(masks) == {f"{name}.weight" for name in targets}
    for name, module in targets.items():
        mask = masks[f"{name}.weight"]
        assert mask.dtype == torch.bool and mask.shape == module.weight.shape
        assert (mask.reshape(-1, 4).sum(-1) == 2).all()
        if method == "magnitude":
            expected = nm.nm_mask(weight_matrix(module).abs(), 2, 4)
            assert torch.equal(to_matrix_layout(module, mask), expected)


def test_one_shot_masks_use_the_parameter_layout_for_conv1d():
    model = make_tiny_model("gpt2")
    masks = one_shot_masks(model, None, MagnitudeConfig(), progress=False)[0]
    module = model.transformer.h[0].attn.c_attn
    mask = masks["transformer.h.0.attn.c_attn.weight"]
    assert mask.shape == module.weight.shape == (64, 192)
    assert torch.equal(mask.t(), nm.nm_mask(module.weight.t().abs(), 2, 4))


def test_a_prior_needs_an_n_m_pattern():
    with pytest.raises(SemisparseError, match="needs an N:M `pattern`"):
        one_shot_masks(make_tiny_model("llama"), None, MagnitudeConfig(sparsity=0.5))


def test_prior_masks_that_do_not_fit_are_rejected():
    model = make_tiny_model("llama")
    prior = one_shot_masks(model, None, MagnitudeConfig(), progress=False)[0]
    name = next(iter(prior))
    prior[name] = torch.ones_like(prior[name])
    with pytest.raises(
        SemisparseError, match=f"mask for '{name}' in the prior masks keeps up to 4 of every 4"
    ):
        attach_learnable_masks(model, TWO_FOUR, prior)
