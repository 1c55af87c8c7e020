"""SLoRB: initial output against a naive loop of the formula, overhead, k checks, keep-SLoRB round trip."""

import pytest
import torch
from conftest import make_tiny_model
from torch import nn
from transformers import AutoModelForCausalLM

from semisparse import nm
from semisparse.errors import SemisparseError
from semisparse.models import load_model
from semisparse.modules import find_targets, weight_matrix
from semisparse.sparse import (
    SLORB_FILE,
    SLoRB,
    SLoRBConfig,
    attach_saved_slorb,
    densify,
    save_slorb,
    slorb_overhead,
    sparsify,
)
from semisparse.sparse.slorb import group_projection


def naive_boosted_output(x, weight, bias, mask, k, init):
    """y[o] = Σ_j (W⊙m)[o,j] x_j + b[o] + Σ_g S[o,g] Σ_{j in g} x_j, S from the pruned weights, by loops."""
    out_features, in_features = weight.shape
    y = torch.zeros(x.shape[0], out_features, dtype=torch.float64)
    for row in range(x.shape[0]):
        for o in range(out_features):
            total = float(bias[o])
            for j in range(in_features):
                if mask[o, j]:
                    total += float(weight[o, j]) * float(x[row, j])
            for g in range(in_features // k):
                pruned = [float(weight[o, j]) for j in range(g * k, (g + 1) * k) if not mask[o, j]]
                s = {"sum": sum(pruned), "mean": sum(pruned) / k, "zeros": 0.0}[init]
                total += s * sum(float(x[row, j]) for j in range(g * k, (g + 1) * k))
            y[row, o] = total
    return y


class OneLayer(nn.Module):
    """The smallest model `find_targets` accepts: one block holding one linear."""

    def __init__(self, in_features=16, out_features=6):
        super().__init__()
        self.model = nn.Module()
        self.model.layers = nn.ModuleList([nn.ModuleDict({"proj": nn.Linear(in_features, out_features)})])

    def forward(self, x):
        return self.model.layers[0]["proj"](x)


@pytest.mark.parametrize("init", ["mean", "sum", "zeros"])
@pytest.mark.parametrize("train_projection", [True, False])
def test_initial_output_matches_the_formula(init, train_projection):
    torch.manual_seed(0)
    model = OneLayer(16, 6)
    weight = model.model.layers[0]["proj"].weight.detach().clone()
    bias = model.model.layers[0]["proj"].bias.detach().clone()
    layer = sparsify(model, slorb=SLoRBConfig(k=4, init=init, train_projection=train_projection))[
        "model.layers.0.proj"
    ]
    x = torch.randn(3, 16)
    expected = naive_boosted_output(x, weight, bias, layer.mask, 4, init)
    torch.testing.assert_close(model(x).double(), expected, rtol=1e-5, atol=1e-5)
    assert (layer.slorb.X is not None) == train_projection


def test_fixed_projection_equals_the_block_indicator_matrix():
    projection = group_projection(8, 4)
    assert torch.equal(projection, torch.tensor([[1.0] * 4 + [0.0] * 4, [0.0] * 4 + [1.0] * 4]))
    trained, fixed = SLoRB(8, 3, 4, train_projection=True), SLoRB(8, 3, 4, train_projection=False)
    with torch.no_grad():
        trained.S.normal_()
        fixed.S.copy_(trained.S)
    x = torch.randn(5, 8)
    torch.testing.assert_close(trained(x), fixed(x))
    assert "X" not in fixed.state_dict()


def test_scales_start_from_given_dense_weights():
    torch.manual_seed(1)
    model = OneLayer(8, 2)
    dense = torch.randn(2, 8)
    config = SLoRBConfig(k=4, init="sum")
    layer = sparsify(model, slorb=config, slorb_weights={"model.layers.0.proj": dense})["model.layers.0.proj"]
    expected = (dense * ~layer.mask).reshape(2, 2, 4).sum(-1)
    torch.testing.assert_close(layer.slorb.S.detach(), expected)


def test_group_size_must_divide_the_inputs():
    model = make_tiny_model("llama")
    before = set(find_targets(model))
    with pytest.raises(SemisparseError, match=r"k=12 does not divide the 64 inputs of model\.layers\.0\."):
        sparsify(model, slorb=SLoRBConfig(k=12))
    assert set(find_targets(model)) == before, "a rejected request must not swap anything"
    with pytest.raises(SemisparseError, match="positive integer"):
        SLoRBConfig(k=0)
    with pytest.raises(SemisparseError, match="unknown SLoRB init"):
        SLoRBConfig(init="median")


@pytest.mark.parametrize("train_projection", [True, False])
def test_overhead_counts_s_and_trained_projection(train_projection):
    model = make_tiny_model("llama")
    shapes = [tuple(weight_matrix(m).shape) for m in find_targets(model).values()]
    sparsify(model, slorb=SLoRBConfig(k=16, train_projection=train_projection))
    report = slorb_overhead(model)
    s_params = sum(o * i // 16 for o, i in shapes)
    x_params = sum(i * i // 16 for _, i in shapes) if train_projection else 0
    kept = sum(o * i // 2 for o, i in shapes)
    assert report["s_params"] == s_params and report["x_params"] == x_params
    assert report["kept_weights"] == kept and report["layers"] == len(shapes)
    assert report["ratio_to_kept"] == pytest.approx((s_params + x_params) / kept)
    if not train_projection:
        assert report["ratio_to_kept"] == pytest.approx(0.125)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("train_projection", [True, False])
def test_kept_slorb_round_trip(tmp_path, arch, train_projection):
    model = make_tiny_model(arch)
    layers = sparsify(model, slorb=SLoRBConfig(k=16, train_projection=train_projection))
    with torch.no_grad():
        for layer in layers.values():
            layer.slorb.S.normal_(std=0.05)
            if layer.slorb.X is not None:
                layer.slorb.X.add_(0.1)
    ids = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        expected = model(ids).logits
    tensors = densify(model, keep_slorb=True)
    assert len(tensors) == len(layers) * (2 if train_projection else 1)
    model.save_pretrained(tmp_path)
    save_slorb(tensors, tmp_path)
    assert (tmp_path / SLORB_FILE).is_file()

    plain = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    for module in find_targets(plain).values():
        assert nm.is_nm(weight_matrix(module), 2, 4)
    with torch.no_grad():
        assert not torch.allclose(plain(ids).logits, expected, atol=1e-4), "SLoRB must matter in this test"
    assert attach_saved_slorb(plain, tmp_path) is True
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, expected)
    assert attach_saved_slorb(plain, tmp_path) is True  # re-attaching replaces, never adds twice
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, expected)
    with torch.no_grad():
        torch.testing.assert_close(load_model(str(tmp_path))(ids).logits, expected)


def test_attach_without_a_file_is_a_no_op(tmp_path):
    assert attach_saved_slorb(make_tiny_model("llama"), tmp_path) is False


def test_attach_rejects_a_file_of_another_model(tmp_path):
    save_slorb({"model.layers.9.mlp.up_proj.S": torch.zeros(128, 4)}, tmp_path)
    with pytest.raises(SemisparseError, match="not a linear layer of this model"):
        attach_saved_slorb(make_tiny_model("llama"), tmp_path)
    save_slorb({"model.layers.0.mlp.up_proj.S": torch.zeros(128, 5)}, tmp_path)
    with pytest.raises(SemisparseError, match="does not fit"):
        attach_saved_slorb(make_tiny_model("llama"), tmp_path)


def test_attach_rejects_a_truncated_file_in_one_line(tmp_path):
    path = save_slorb({"model.layers.0.mlp.up_proj.S": torch.zeros(128, 4)}, tmp_path)
    data = path.read_bytes()
    for cut in (len(data) // 2, 5):
        path.write_bytes(data[:cut])
        with pytest.raises(SemisparseError, match=r"slorb.safetensors is damaged") as info:
            attach_saved_slorb(make_tiny_model("llama"), tmp_path)
        assert "\n" not in str(info.value)
