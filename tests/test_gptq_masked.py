"""Masked GPTQ treats a pruned weight as quantized to exactly 0 and propagates its drift (issue 13 §2).

Earlier columns push their rounding error into every later column of the row, pruned ones included. When
the sweep reaches a pruned position its value must become 0 and the whole accumulated drift must be
propagated to the later columns, as SparseGPT's joint prune+quantize does; discarding it (the old code)
is not the OBS update and could end up worse than round-to-nearest.
"""

from __future__ import annotations

import pytest
import torch

from semisparse import nm
from semisparse.pruning.sparsegpt import inverse_hessian_cholesky
from semisparse.quantization import gptq_quantize_weight, rtn_quantize
from semisparse.quantization.rtn import expand_groups, grid_for, grid_zeros, quantize_codes

BITS = 3


def correlated_problem(
    seed: int, rows: int = 32, cols: int = 128, n: int = 512
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inputs `X = Z @ A` (strongly correlated, full rank), a 2:4 sparse weight and its mask."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, cols, generator=gen) @ torch.randn(cols, cols, generator=gen)
    w = torch.randn(rows, cols, generator=gen)
    mask = nm.nm_mask(w.abs(), 2, 4)
    return x, w * mask, mask


def output_error(x: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> float:
    return float((x @ (target - weight).T).square().sum())


def damped(hessian: torch.Tensor, percdamp: float = 0.01) -> torch.Tensor:
    h = hessian.clone()
    torch.diagonal(h).add_(percdamp * torch.diagonal(h).mean())
    return h


def exact_restricted(
    w: torch.Tensor, mask: torch.Tensor, hessian: torch.Tensor, act_order: bool
) -> torch.Tensor:
    """Per row, an unmasked GPTQ sweep on the Hessian restricted to its kept columns (one grid per row)."""
    h = damped(hessian)
    scale, zero = grid_for(w, mask, BITS, symmetric=False)
    order = torch.argsort(torch.diagonal(h), descending=True) if act_order else torch.arange(w.shape[1])
    out = torch.zeros_like(w)
    for r in range(w.shape[0]):
        kept = order[mask[r, order]]
        upper = inverse_hessian_cholesky(h[kept][:, kept])
        row = w[r, kept].clone()
        for i in range(len(kept)):
            q = (quantize_codes(row[i], scale[r], zero[r], BITS) - zero[r]) * scale[r]
            row[i + 1 :] -= (row[i] - q) / upper[i, i] * upper[i, i + 1 :]
            out[r, kept[i]] = q
    return out


@pytest.mark.parametrize("seed", [1, 2])
@pytest.mark.parametrize("act_order", [False, True])
def test_masked_gptq_beats_rtn_on_correlated_inputs_at_3_bits(seed: int, act_order: bool) -> None:
    # Measured: 0.80-0.88 of RTN's error; dropping the drift gave 0.96-0.97 (seed 1) and 1.02-1.09 (seed 2).
    x, w, mask = correlated_problem(seed)
    hessian = 2 * x.T @ x / x.shape[0]
    rtn = output_error(x, w, rtn_quantize(w, mask, BITS, None).dequantize())
    gptq = gptq_quantize_weight(w, mask, hessian, BITS, None, act_order=act_order).dequantize()
    assert output_error(x, w, gptq) <= 0.92 * rtn


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("act_order", [False, True])
def test_masked_gptq_is_close_to_the_exact_restricted_solution(seed: int, act_order: bool) -> None:
    # Measured: propagating the drift is within 1.11-1.18 of the restricted sweep, dropping it 1.31-1.43.
    x, w, mask = correlated_problem(seed)
    hessian = 2 * x.T @ x / x.shape[0]
    exact = output_error(x, w, exact_restricted(w, mask, hessian, act_order))
    gptq = gptq_quantize_weight(w, mask, hessian, BITS, None, act_order=act_order).dequantize()
    assert output_error(x, w, gptq) <= 1.25 * exact


@pytest.mark.parametrize("group_size", [None, 16])
@pytest.mark.parametrize("act_order", [False, True])
def test_masked_gptq_stays_exactly_24_and_on_the_grid(group_size: int | None, act_order: bool) -> None:
    x, w, mask = correlated_problem(seed=2, rows=16, cols=64)
    hessian = 2 * x.T @ x / x.shape[0]
    q = gptq_quantize_weight(w, mask, hessian, BITS, group_size, blocksize=32, act_order=act_order)
    dense = q.dequantize()
    assert nm.is_nm(dense, 2, 4)
    assert torch.all(dense[~mask] == 0) and torch.all(q.codes[~mask] == 0)
    assert int(q.codes.max()) <= 2**BITS - 1
    scale = expand_groups(q.scales.float(), w.shape[1], group_size)
    zero = expand_groups(grid_zeros(q), w.shape[1], group_size)
    assert torch.equal(dense[mask], ((q.codes.float() - zero) * scale)[mask])


def conditional_sweep(
    w: torch.Tensor, mask: torch.Tensor, hessian: torch.Tensor, group_size: int | None, act_order: bool
) -> torch.Tensor:
    """Reference without Cholesky updates: each column, in sweep order, takes the least-squares optimum of the
    not-yet-fixed weights given the fixed ones, `v_R = t_R + H_RR⁻¹ H_RS (t_S − v_S)`, then is fixed to its
    grid point if kept or to exactly 0 if pruned. Grids are static (from `t`) with act order or one grid per
    row, else fixed from the current optimum when the sweep reaches a group's first column."""
    rows, cols = w.shape
    h = hessian.double()
    size = cols if group_size is None else group_size
    static = act_order or group_size is None
    order = torch.argsort(torch.diagonal(hessian), descending=True) if act_order else torch.arange(cols)
    static_grids = [
        grid_for(w[:, g : g + size], mask[:, g : g + size], BITS, False) for g in range(0, cols, size)
    ]
    out = torch.zeros(rows, cols, dtype=torch.float64)
    for r in range(rows):
        t = w[r].double()
        grids = [(scale[r], zero[r]) for scale, zero in static_grids]
        for i, col in enumerate(order.tolist()):
            fixed, rest = order[:i], order[i:]
            current = t[rest] + torch.linalg.solve(
                h[rest][:, rest], h[rest][:, fixed] @ (t[fixed] - out[r, fixed])
            )
            if not static and col % size == 0:
                group = torch.zeros(1, size)
                group[0, rest[rest < col + size] - col] = current[rest < col + size].float()
                scale, zero = grid_for(group, mask[r : r + 1, col : col + size], BITS, False)
                grids[col // size] = (scale[0], zero[0])
            scale, zero = grids[col // size]
            if mask[r, col]:
                out[r, col] = float((quantize_codes(current[0], scale, zero, BITS) - zero) * scale)
    return out.float()


@pytest.mark.parametrize(("group_size", "act_order"), [(None, False), (None, True), (4, False), (4, True)])
def test_masked_gptq_equals_the_sequential_least_squares_formula(
    group_size: int | None, act_order: bool
) -> None:
    gen = torch.Generator().manual_seed(5)
    rows, cols = 4, 12
    x = torch.randn(64, cols, generator=gen) @ torch.randn(cols, cols, generator=gen)
    w = torch.randn(rows, cols, generator=gen)
    mask = nm.nm_mask(w.abs(), 2, 4)
    w = w * mask
    hessian = x.T @ x
    q = gptq_quantize_weight(
        w, mask, hessian, BITS, group_size, blocksize=4, percdamp=0.0, act_order=act_order
    )
    expected = conditional_sweep(w, mask, hessian, group_size, act_order)
    torch.testing.assert_close(q.dequantize(), expected, rtol=0, atol=1e-5)
