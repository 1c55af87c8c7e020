"""Quantization keeps the zeros: exact N:M after RTN and GPTQ, codes on the grid, GPTQ beats RTN."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_model

from semisparse import nm
from semisparse.errors import SemisparseError
from semisparse.modules import find_targets, weight_matrix
from semisparse.pruning import MagnitudeConfig, prune
from semisparse.quantization import RTNConfig, gptq_quantize_weight, quantize, quantizer_config, rtn_quantize
from semisparse.quantization.rtn import expand_groups, grid_zeros


def sparse_weight(rows: int = 16, cols: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    w = torch.randn(rows, cols)
    mask = nm.nm_mask(w.abs(), 2, 4)
    return w * mask, mask


def test_rtn_formula_on_a_small_tensor() -> None:
    w = torch.tensor([[0.0, -1.0, 0.0, 2.0, 0.5, 0.0, 0.0, -0.25]])
    mask = w != 0
    q = rtn_quantize(w, mask, bits=4, group_size=4)
    # group 0: lo=-1, hi=2, scale=3/15=0.2, zero=round(1/0.2)=5; -1 -> 0, 2 -> 15
    # group 1: lo=-0.25, hi=0.5, scale=0.75/15=0.05, zero=5; 0.5 -> 15, -0.25 -> 0
    scale0 = torch.tensor(0.2, dtype=torch.float16).item()
    scale1 = torch.tensor(0.05, dtype=torch.float16).item()
    assert q.scales.tolist() == [[scale0, scale1]]
    assert q.zeros.tolist() == [[5, 5]]
    assert q.codes.tolist() == [[0, 0, 0, 15, 15, 0, 0, 0]]
    expected = [0.0, -5 * scale0, 0.0, 10 * scale0, 10 * scale1, 0.0, 0.0, -5 * scale1]
    assert torch.equal(q.dequantize()[0], torch.tensor(expected))


def test_symmetric_grid_has_no_zero_points_and_midpoint_zero() -> None:
    w, mask = sparse_weight()
    q = rtn_quantize(w, mask, bits=8, group_size=None, symmetric=True)
    assert q.zeros is None and q.scales.shape == (16, 1)
    assert torch.equal(grid_zeros(q), torch.full((16, 1), 128.0))
    amax = (w.abs().amax(dim=1, keepdim=True) / 127).half().float()
    assert torch.equal(q.scales.float(), amax)
    assert (q.dequantize() - w).abs().max() <= amax.max() / 2 + 1e-6


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group_size", [16, None])
@pytest.mark.parametrize("method", ["rtn", "gptq", "gptq-natural-order"])
def test_quantized_weights_stay_exactly_24_and_on_the_grid(
    bits: int, group_size: int | None, method: str
) -> None:
    w, mask = sparse_weight()
    if method == "rtn":
        q = rtn_quantize(w, mask, bits, group_size)
    else:
        x = torch.randn(256, 64) * torch.linspace(0.1, 3.0, 64)
        act_order = method == "gptq"
        q = gptq_quantize_weight(w, mask, 2 * x.T @ x / 256, bits, group_size, 32, act_order=act_order)
    dense = q.dequantize()
    assert nm.is_nm(dense, 2, 4)
    assert torch.all(dense[~mask] == 0)
    assert int(q.codes.max()) <= 2**bits - 1
    cols = w.shape[1]
    scale = expand_groups(q.scales.float(), cols, group_size)
    zero = expand_groups(grid_zeros(q), cols, group_size)
    on_grid = (q.codes.float() - zero) * scale
    assert torch.equal(dense[mask], on_grid[mask])
    assert q.scales.shape == (16, 1 if group_size is None else cols // group_size)


def test_gptq_reconstruction_error_beats_rtn_on_correlated_inputs() -> None:
    torch.manual_seed(1)
    rows, cols, n = 32, 128, 1024
    x = torch.randn(n, 8) @ torch.randn(8, cols) + 0.05 * torch.randn(n, cols)
    w, mask = sparse_weight(rows, cols, seed=2)
    hessian = 2 * x.T @ x / n

    def error(weight: torch.Tensor) -> float:
        return float((x @ w.T - x @ weight.T).square().sum())

    for bits, group in ((4, 64), (4, None), (8, None)):
        rtn = rtn_quantize(w, mask, bits, group).dequantize()
        for act_order in (True, False):
            gptq = gptq_quantize_weight(w, mask, hessian, bits, group, act_order=act_order).dequantize()
            assert nm.is_nm(gptq, 2, 4)
            assert error(gptq) < 0.8 * error(rtn)


def test_act_order_helps_when_late_inputs_carry_most_of_the_energy() -> None:
    torch.manual_seed(3)
    rows, cols, n = 64, 256, 2048
    x = torch.randn(n, 16) @ torch.randn(16, cols) + 0.1 * torch.randn(n, cols)
    x[:, -16:] *= 20.0  # outlier features that the natural order would quantize last, uncompensated
    w, mask = sparse_weight(rows, cols, seed=4)
    hessian = 2 * x.T @ x / n

    def error(act_order: bool) -> float:
        q = gptq_quantize_weight(w, mask, hessian, 4, 64, act_order=act_order).dequantize()
        return float((x @ w.T - x @ q.T).square().sum())

    assert error(True) < 0.7 * error(False)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_quantize_model_keeps_pattern_and_returns_codes(arch: str, method: str) -> None:
    model = make_tiny_model(arch)
    prune(model, MagnitudeConfig())
    before = {name: weight_matrix(m).detach().clone() for name, m in find_targets(model).items()}
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    result = quantize(
        model, quantizer_config(method, bits=4, group_size=32), calibration_ids=ids, progress=False
    )
    assert set(result) == set(before)
    for name, module in find_targets(model).items():
        after = weight_matrix(module)
        assert nm.is_nm(after, 2, 4)
        assert torch.all(after[before[name] == 0] == 0)
        assert torch.equal(after, result[name].dequantize())
        assert not torch.equal(after, before[name])
    assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()


def test_bad_settings_are_user_errors() -> None:
    model = make_tiny_model("llama")
    with pytest.raises(SemisparseError, match="`bits`=3 must be one of 4, 8"):
        quantize(model, RTNConfig(bits=3))
    with pytest.raises(SemisparseError, match="`group_size`=0 must be >= 1"):
        quantize(model, RTNConfig(group_size=0))
    with pytest.raises(SemisparseError, match="calibration"):
        quantize(model, quantizer_config("gptq"))
    with pytest.raises(SemisparseError, match="unknown quantizer 'awq'"):
        quantize(model, quantizer_config("awq"))
