"""Adaptive masks: exactly N:M after every update, flip rates on a constructed example, Wanda scoring."""

import pytest
import torch
from torch import nn

from semisparse import nm
from semisparse.nm import NMPattern
from semisparse.sparse import SparseLinear
from semisparse.training.adaptive_mask import MaskUpdater, collect_input_norms

TWO_FOUR = NMPattern(2, 4)


def layer_with(weight, pattern=TWO_FOUR):
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    with torch.no_grad():
        linear.weight.copy_(weight)
    return SparseLinear.from_module(linear, nm.nm_mask(weight.abs(), pattern.n, pattern.m))


def exactly_nm(mask, pattern):
    return nm.is_nm(mask, pattern.n, pattern.m, exact=True)


@pytest.mark.parametrize(
    ("shape", "pattern"), [((8, 16), NMPattern(2, 4)), ((5, 24), NMPattern(1, 4)), ((3, 64), NMPattern(4, 8))]
)
def test_masks_stay_exactly_nm_after_every_update(shape, pattern):
    torch.manual_seed(0)
    layers = {"a": layer_with(torch.randn(*shape), pattern), "b": layer_with(torch.randn(*shape), pattern)}
    updater = MaskUpdater(layers, pattern)
    for step in range(6):
        with torch.no_grad():
            for layer in layers.values():
                layer.weight.add_(torch.randn(shape) * 0.5)
                if step == 3:
                    layer.weight.zero_()  # all ties: still exactly N per group
        updater.update()
        for layer in layers.values():
            assert layer.mask.dtype == torch.bool and exactly_nm(layer.mask, pattern)
            torch.testing.assert_close(
                layer.mask, nm.nm_mask(layer.weight.detach().abs(), pattern.n, pattern.m)
            )


def test_flip_rates_on_a_constructed_example():
    layer = layer_with(torch.tensor([[4.0, 3.0, 2.0, 1.0, 1.0, 2.0, 3.0, 4.0]]))
    other = layer_with(torch.tensor([[1.0, 2.0, 3.0, 4.0, 1.0, 2.0, 3.0, 4.0]]))
    updater = MaskUpdater({"a": layer, "b": other}, NMPattern(2, 4))
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, 2.0, 3.0, 4.0, 1.0, 2.0, 3.0, 4.0]]))
    # 4 of 16 entries flip (first group of "a"), relative to both the last and the initial masks
    assert updater.update() == {"flip_rate": 0.25, "flip_rate_initial": 0.25}
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[4.0, 3.0, 2.0, 1.0, 1.0, 2.0, 3.0, 4.0]]))
        other.weight.copy_(torch.tensor([[1.0, 2.0, 3.0, 4.0, 4.0, 3.0, 2.0, 1.0]]))
    # "a" returns to its initial mask (4 flips vs last, 0 vs initial); "b" flips its second group
    assert updater.update() == {"flip_rate": 0.5, "flip_rate_initial": 0.25}
    assert updater.update() == {"flip_rate": 0.0, "flip_rate_initial": 0.25}


def test_wanda_score_weights_columns_by_input_norm():
    layer = layer_with(torch.tensor([[4.0, 3.0, 2.0, 1.0]]))
    norms = {"a": torch.tensor([1.0, 1.0, 100.0, 100.0])}  # sqrt: 1, 1, 10, 10 -> scores 4, 3, 20, 10
    updater = MaskUpdater({"a": layer}, NMPattern(2, 4), score="wanda", input_sq_norms=norms)
    assert updater.update()["flip_rate"] == 1.0
    assert layer.mask.tolist() == [[False, False, True, True]]
    with pytest.raises(ValueError, match="input norms"):
        MaskUpdater({"a": layer}, NMPattern(2, 4), score="wanda")


class Embedded(nn.Module):
    """Takes input_ids like a causal LM, so collect_input_norms can drive it."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.proj = layer_with(torch.randn(4, 8))

    def forward(self, input_ids):
        return self.proj(self.embed(input_ids))


def test_input_norms_are_squared_sums_over_all_tokens():
    torch.manual_seed(1)
    model = Embedded()
    ids = torch.randint(0, 10, (5, 7))
    norms = collect_input_norms(model, {"proj": model.proj}, ids, batch_size=2)
    expected = model.embed(ids).detach().reshape(-1, 8).square().sum(0)
    torch.testing.assert_close(norms["proj"], expected)
    assert not model.proj._forward_hooks, "hooks must be removed"


def test_state_dict_restores_initial_masks_and_norms():
    torch.manual_seed(2)
    weight = torch.randn(4, 16)
    norms = {"a": torch.rand(16)}
    updater = MaskUpdater({"a": layer_with(weight)}, NMPattern(2, 4), "wanda", norms)
    state = updater.state_dict()
    assert state["initial_masks"]["a"].dtype == torch.uint8
    fresh_layer = layer_with(torch.randn(4, 16))
    fresh = MaskUpdater({"a": fresh_layer}, NMPattern(2, 4), "wanda", {"a": torch.zeros(16)})
    fresh.load_state_dict(state)
    assert torch.equal(fresh.initial["a"], updater.initial["a"])
    torch.testing.assert_close(fresh.input_sq_norms["a"], norms["a"])


def test_row_sharded_weights_give_the_whole_mask(one_process_mesh):
    from torch.distributed.tensor import Shard, distribute_tensor

    torch.manual_seed(4)
    layer = layer_with(torch.randn(6, 16))
    weight = torch.randn(6, 16)
    layer.weight = nn.Parameter(distribute_tensor(weight, one_process_mesh, [Shard(0)]))
    MaskUpdater({"a": layer}, TWO_FOUR).update()
    assert not isinstance(layer.mask, type(layer.weight))
    assert torch.equal(layer.mask, nm.nm_mask(weight.abs(), 2, 4))
