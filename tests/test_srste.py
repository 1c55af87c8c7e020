"""SRSTEAdamW against the `../shared/METHODS.md` §2.3 formula written out by hand, and torch's AdamW."""

import copy
import math

import pytest
import torch
from torch import nn

from semisparse.training.srste import SRSTEAdamW, annealed_decay

LR, BETAS, EPS, WD = 0.01, (0.9, 0.95), 1e-8, 0.1


def reference_masked_steps(w, grads, masks, decays):
    """The formula, one step at a time, with plain Python floats per entry."""
    w = [float(v) for v in w]
    m1 = [0.0] * len(w)
    v = [0.0] * len(w)
    b1, b2 = BETAS
    for t, (g, mask, lam) in enumerate(zip(grads, masks, decays, strict=True), start=1):
        for i in range(len(w)):
            w[i] *= 1 - LR * WD
            m1[i] = b1 * m1[i] + (1 - b1) * float(g[i])
            d = lam * (0.0 if mask[i] else 1.0) * w[i]
            u = m1[i] + d
            v[i] = b2 * v[i] + (1 - b2) * u * u
            w[i] -= LR / (1 - b1**t) * u / (math.sqrt(v[i] / (1 - b2**t)) + EPS)
    return torch.tensor(w, dtype=torch.float64)


def test_masked_update_matches_the_formula_step_by_step():
    torch.manual_seed(0)
    w0 = torch.randn(8, dtype=torch.float64)
    grads = [torch.randn(8, dtype=torch.float64) for _ in range(4)]
    masks = [torch.tensor([1, 1, 0, 0, 0, 1, 1, 0], dtype=torch.bool)] * 2
    masks += [torch.tensor([0, 1, 1, 0, 1, 0, 1, 0], dtype=torch.bool)] * 2  # the mask moves in place
    decays = [0.0, 0.5, 1.0, 2.0]
    param = nn.Parameter(w0.clone())
    mask = masks[0].clone()
    opt = SRSTEAdamW([param], {param: mask}, lr=LR, betas=BETAS, eps=EPS, weight_decay=WD)
    for step, (g, new_mask, lam) in enumerate(zip(grads, masks, decays, strict=True)):
        mask.copy_(new_mask)
        opt.set_decay(lam)
        param.grad = g.clone()
        opt.step()
        expected = reference_masked_steps(w0, grads[: step + 1], masks[: step + 1], decays[: step + 1])
        torch.testing.assert_close(param.detach(), expected, rtol=1e-12, atol=1e-12)


def test_plain_parameters_match_torch_adamw():
    torch.manual_seed(1)
    ours = [nn.Parameter(torch.randn(5, 3)), nn.Parameter(torch.randn(7))]
    theirs = [nn.Parameter(p.detach().clone()) for p in ours]
    masked, idle = nn.Parameter(torch.randn(2, 4)), nn.Parameter(torch.randn(3))
    idle_before = idle.detach().clone()
    # masked and gradient-less parameters in the same group must not disturb the plain ones
    opt = SRSTEAdamW(
        [*ours, masked, idle], {masked: torch.rand(2, 4) > 0.5}, lr=LR, betas=BETAS, eps=EPS, weight_decay=WD
    )
    opt.set_decay(1.0)  # no mask: the decay must not touch the plain parameters
    reference = torch.optim.AdamW(theirs, lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, foreach=False)
    for _ in range(5):
        for a, b in zip(ours, theirs, strict=True):
            g = torch.randn_like(a)
            a.grad, b.grad = g.clone(), g.clone()
        masked.grad = torch.randn_like(masked)
        opt.step()
        reference.step()
        for a, b in zip(ours, theirs, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert torch.equal(idle, idle_before) and idle not in opt.state


def test_decay_shrinks_pruned_weights_and_leaves_kept_ones_alone():
    w0 = torch.tensor([[1.0, -2.0, 3.0, -4.0], [-0.5, 0.25, 0.75, -1.5]])
    mask = torch.tensor([[True, False, True, False], [False, True, False, True]])
    param = nn.Parameter(w0.clone())
    opt = SRSTEAdamW([param], {param: mask}, lr=0.01, weight_decay=0.0, decay=0.1)
    for _ in range(3):
        param.grad = torch.zeros_like(param)
        opt.step()
    after = param.detach()
    assert torch.equal(after[mask], w0[mask])
    assert bool((after[~mask].abs() < w0[~mask].abs()).all())
    assert bool((after[~mask].sign() == w0[~mask].sign()).all())


def test_int_masks_are_refused():
    param = nn.Parameter(torch.zeros(4))
    with pytest.raises(TypeError, match="bool"):
        SRSTEAdamW([param], {param: torch.ones(4, dtype=torch.int64)})


def test_decay_survives_state_dict_and_resume_is_exact():
    torch.manual_seed(2)
    param = nn.Parameter(torch.randn(4, 8))
    mask = torch.rand(4, 8) > 0.5
    grads = [torch.randn(4, 8) for _ in range(6)]

    def make(p):
        return SRSTEAdamW([p], {p: mask}, lr=LR, betas=BETAS, weight_decay=WD)

    straight = nn.Parameter(param.detach().clone())
    opt = make(straight)
    for g in grads:
        opt.set_decay(0.3)
        straight.grad = g.clone()
        opt.step()

    first = nn.Parameter(param.detach().clone())
    opt = make(first)
    opt.set_decay(0.3)
    for g in grads[:3]:
        first.grad = g.clone()
        opt.step()
    state = copy.deepcopy(opt.state_dict())
    resumed = nn.Parameter(first.detach().clone())
    opt = make(resumed)
    opt.load_state_dict(state)
    assert opt.param_groups[0]["srste_decay"] == 0.3
    for g in grads[3:]:
        resumed.grad = g.clone()
        opt.step()
    assert torch.equal(resumed, straight)


@pytest.mark.parametrize(
    ("step", "expected"), [(0, 0.0), (250, 0.5e-4), (500, 1e-4), (600, 1e-4), (125, 0.25e-4)]
)
def test_annealed_decay_ramps_linearly_then_holds(step, expected):
    assert annealed_decay(step, 1e-4, 500) == pytest.approx(expected, rel=1e-12, abs=0)


def test_annealed_decay_without_warmup_and_bad_values():
    assert annealed_decay(0, 6e-5, 0) == 6e-5
    with pytest.raises(ValueError):
        annealed_decay(1, -1.0, 10)


def test_row_sharded_dtensor_parameters_step_like_plain_ones(one_process_mesh):
    from torch.distributed.tensor import Shard, distribute_tensor

    torch.manual_seed(3)
    w0, mask = torch.randn(4, 8), torch.rand(4, 8) > 0.5
    plain = nn.Parameter(w0.clone())
    sharded = nn.Parameter(distribute_tensor(w0.clone(), one_process_mesh, [Shard(0)]))
    optimizers = [
        SRSTEAdamW([p], {p: mask}, lr=LR, betas=BETAS, weight_decay=WD, decay=0.5) for p in (plain, sharded)
    ]
    for _ in range(3):
        g = torch.randn(4, 8)
        plain.grad = g.clone()
        sharded.grad = distribute_tensor(g.clone(), one_process_mesh, [Shard(0)])
        for opt in optimizers:
            opt.step()
    torch.testing.assert_close(sharded.full_tensor(), plain.detach())
