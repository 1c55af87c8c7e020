"""SparseLinear and the model swap: masked forward, straight-through gradient, densify to plain models."""

import pytest
import torch
from conftest import ARCHS, make_tiny_model
from torch import nn
from transformers import AutoModelForCausalLM
from transformers.pytorch_utils import Conv1D

from semisparse import nm
from semisparse.errors import SemisparseError
from semisparse.modules import find_targets, weight_matrix
from semisparse.nm import NMPattern
from semisparse.sparse import SparseLinear, densify, sparse_layers, sparsify


def random_mask(out_features, in_features, n=2, m=4, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return nm.nm_mask(torch.rand(out_features, in_features, generator=generator), n, m)


def test_forward_equals_a_linear_holding_the_masked_weight():
    torch.manual_seed(0)
    linear = nn.Linear(16, 8)
    mask = random_mask(8, 16)
    reference = nn.Linear(16, 8)
    reference.load_state_dict({"weight": linear.weight * mask, "bias": linear.bias})
    layer = SparseLinear.from_module(linear, mask)
    x = torch.randn(3, 5, 16)
    torch.testing.assert_close(layer(x), reference(x), rtol=0, atol=0)
    assert layer.mask.dtype == torch.bool and torch.equal(layer.masked_weight(), linear.weight * mask)


@pytest.mark.parametrize("source", ["linear", "conv1d"])
def test_straight_through_gradient_is_the_dense_gradient_at_every_position(source):
    torch.manual_seed(1)
    mask = random_mask(8, 16, seed=1)
    module = nn.Linear(16, 8) if source == "linear" else Conv1D(8, 16)
    w = weight_matrix(module).detach().clone()
    layer = SparseLinear.from_module(module, mask)
    reference = nn.Linear(16, 8)
    reference.load_state_dict({"weight": w * mask, "bias": module.bias.detach()})
    x = torch.randn(4, 16)
    target = torch.randn(4, 8)
    ((layer(x) - target) ** 2).sum().backward()
    ((reference(x) - target) ** 2).sum().backward()
    torch.testing.assert_close(layer.weight.grad, reference.weight.grad)
    torch.testing.assert_close(layer.bias.grad, reference.bias.grad)
    assert bool((layer.weight.grad[~mask] != 0).all()), "pruned weights must keep receiving gradient"


def test_the_graph_saves_the_weight_itself_not_a_masked_copy():
    """A masked copy per layer alive until the backward would double the sparse weights' memory."""
    layer = SparseLinear.from_module(nn.Linear(16, 8), random_mask(8, 16))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        layer(torch.randn(2, 16))
    weight_sized = [t for t in saved if t.shape == layer.weight.shape and t.is_floating_point()]
    assert weight_sized and all(t.data_ptr() == layer.weight.data_ptr() for t in weight_sized)


def test_mask_updates_in_place_change_the_forward():
    linear = nn.Linear(8, 4)
    layer = SparseLinear.from_module(linear, random_mask(4, 8, seed=2))
    buffer = layer.mask
    new = random_mask(4, 8, seed=3)
    layer.mask.copy_(new)
    x = torch.randn(2, 8)
    assert layer.mask is buffer
    torch.testing.assert_close(layer(x), x @ (linear.weight * new).t() + linear.bias)


def test_bf16_autocast_and_bf16_weights():
    layer = SparseLinear.from_module(nn.Linear(16, 8), random_mask(8, 16))
    x = torch.randn(2, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert layer.weight.grad.dtype == torch.float32
    half = SparseLinear.from_module(nn.Linear(16, 8).to(torch.bfloat16), random_mask(8, 16))
    out = half(x.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16 and half.mask.dtype == torch.bool


def test_meta_device_construction():
    layer = SparseLinear(16, 8, device="meta")
    assert layer.weight.is_meta and layer.mask.is_meta and layer.mask.dtype == torch.bool
    wrapped = SparseLinear.from_module(nn.Linear(16, 8, device="meta"), torch.ones(8, 16, dtype=torch.bool))
    assert wrapped.mask.is_meta and wrapped(torch.empty(2, 16, device="meta")).shape == (2, 8)


@pytest.mark.parametrize("arch", ARCHS)
def test_sparsify_swaps_every_target_and_keeps_state_dict_names(arch):
    model = make_tiny_model(arch)
    expected = {name: weight_matrix(module).detach().clone() for name, module in find_targets(model).items()}
    layers = sparsify(model)
    assert set(layers) == set(expected) == set(sparse_layers(model))
    keys = model.state_dict().keys()
    for name, layer in layers.items():
        assert model.get_submodule(name) is layer
        assert {f"{name}.weight", f"{name}.mask"} <= keys
        torch.testing.assert_close(layer.weight, expected[name], rtol=0, atol=0)
        torch.testing.assert_close(layer.mask, nm.nm_mask(expected[name].abs(), 2, 4))


def test_sparsify_uses_given_masks_and_rejects_bad_ones():
    model = make_tiny_model("llama")
    targets = find_targets(model)
    masks = {
        name: random_mask(*weight_matrix(m).shape, seed=i) for i, (name, m) in enumerate(targets.items())
    }
    layers = sparsify(make_tiny_model("llama"), masks)
    for name, layer in layers.items():
        assert torch.equal(layer.mask, masks[name])
    first = next(iter(masks))
    with pytest.raises(SemisparseError, match="exactly 2:4"):
        sparsify(make_tiny_model("llama"), masks | {first: torch.ones_like(masks[first])})
    with pytest.raises(SemisparseError, match="shape"):
        sparsify(make_tiny_model("llama"), masks | {first: masks[first][:, :4]})
    with pytest.raises(SemisparseError, match="do not match the target layers"):
        sparsify(make_tiny_model("llama"), {k: v for k, v in masks.items() if k != first})


def test_pruned_weights_come_back_through_training():
    model = make_tiny_model("llama")
    layers = sparsify(model, pattern=NMPattern(2, 4))
    layer = next(iter(layers.values()))
    before = layer.weight.detach().clone()
    model(torch.randint(0, 256, (2, 12))).logits.sum().backward()
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    assert bool((layer.weight[~layer.mask] != before[~layer.mask]).any())


@pytest.mark.parametrize("arch", ARCHS)
def test_densify_saves_a_plain_transformers_model_with_the_same_logits(tmp_path, arch):
    model = make_tiny_model(arch)
    layers = sparsify(model, pattern=NMPattern(2, 4))
    with torch.no_grad():
        for layer in layers.values():
            layer.weight.add_(0.01)  # pruned entries are nonzero: only the mask may hide them
    ids = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        expected = model(ids).logits
    assert densify(model) == {}
    assert not sparse_layers(model)
    for name, module in find_targets(model).items():
        assert type(module) is (Conv1D if arch == "gpt2" else nn.Linear), name
        assert nm.is_nm(weight_matrix(module), 2, 4)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, expected)
