"""Running Gram matrices `H = β·H + α·xᵀx` for Hessian-based pruners, computing only the upper triangle.

`xᵀx` is symmetric, so half of a full matrix product is wasted work. On CPU in float32 with torch on one
thread, BLAS `ssyrk` (scipy's OpenBLAS, on one thread too) computes exactly the triangle: a quarter less
Hessian time in `benchmarks/results/prune_speed_32x1024_cpu_1thread.md`. Elsewhere the triangle is covered by
column blocks of ordinary products (torch has no `syrk`): with more threads, OpenBLAS's threads fight
OpenMP's spinning workers (the demo's SparseGPT prune on 2 threads: 222 s with `ssyrk`, 185 s with blocks).
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import torch
from torch import Tensor


def add_upper_gram(hessian: Tensor, x: Tensor, beta: float = 1.0, alpha: float = 1.0) -> None:
    """`hessian = beta·hessian + alpha·xᵀ x` on and above the diagonal; the strictly lower triangle is not
    kept up to date (`symmetrize_from_upper` fills it). `hessian` is [cols, cols], `x` [tokens, cols]."""
    if not _syrk_upper(hessian, x, beta, alpha):
        _blocked_upper(hessian, x, beta, alpha)


def symmetrize_from_upper(hessian: Tensor) -> None:
    """Make the strictly lower triangle the transpose of the strictly upper one, in place (exactly)."""
    lower = torch.tril(hessian.t(), -1)
    hessian.triu_().add_(lower)


def _blocked_upper(hessian: Tensor, x: Tensor, beta: float, alpha: float) -> None:
    """Eight column blocks of at least 96 columns: about 9/16 of a full product's work, each block large
    enough to run at full matrix-product speed."""
    cols = x.shape[1]
    width = max(96, -(-cols // 8))
    for start in range(0, cols, width):
        end = min(start + width, cols)
        hessian[start:end, start:].addmm_(x[:, start:end].t(), x[:, start:], beta=beta, alpha=alpha)


def _syrk_upper(hessian: Tensor, x: Tensor, beta: float, alpha: float) -> bool:
    """BLAS `ssyrk` in place on CPU float32 tensors, torch on one thread; False (nothing done) elsewhere."""
    blas = _cpu_blas()
    if (
        blas is None
        or torch.get_num_threads() != 1
        or hessian.device.type != "cpu"
        or x.device.type != "cpu"
        or hessian.dtype != torch.float32
        or x.dtype != torch.float32
        or not hessian.is_contiguous()
        or hessian.requires_grad
        or x.requires_grad
    ):
        return False
    ssyrk, threads = blas
    # Row-major [tokens, cols] is column-major [cols, tokens]: `ssyrk` with trans=0 forms (xᵀ)(xᵀ)ᵀ = xᵀx.
    # The row-major Hessian read column-major is its transpose, so its upper triangle is the "lower" one.
    c = hessian.numpy().T
    with threads.limit(limits=1):
        out = ssyrk(alpha, x.contiguous().numpy().T, beta=beta, c=c, trans=0, lower=1, overwrite_c=1)
    if not np.shares_memory(out, c):
        hessian.copy_(torch.from_numpy(np.ascontiguousarray(out.T)))
    return True


@functools.cache
def _cpu_blas() -> tuple[Any, Any] | None:
    """scipy's `ssyrk` and a handle on its BLAS thread pool, or None when scipy is unavailable."""
    try:
        from scipy.linalg import blas
        from threadpoolctl import ThreadpoolController
    except ImportError:
        return None
    return blas.ssyrk, ThreadpoolController().select(user_api="blas")
