"""SparseGPT (Frantar & Alistarh 2023): prune with OBS weight reconstruction on the layer Hessian.

The layer's loss `||X Wᵀ − X Ŵᵀ||²` has Hessian `H = 2 X Xᵀ` (per row of W). Columns are processed left
to right; pruning a weight moves the not-yet-processed weights of its row to compensate, using row `j` of
the upper Cholesky factor of `H⁻¹` (which equals the OBS update on the remaining columns). Updates are
applied lazily in blocks of columns, so the work per column touches only its block.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from semisparse import nm
from semisparse.errors import SemisparseError
from semisparse.modules import set_weight_matrix, weight_matrix
from semisparse.nm import NMPattern
from semisparse.pruning.config import PrunerConfig
from semisparse.pruning.gram import add_upper_gram, symmetrize_from_upper
from semisparse.registry import register
from semisparse.settings import setting


def inverse_hessian_cholesky(hessian: Tensor, layer_name: str = "layer") -> Tensor:
    """Upper Cholesky factor `U` of `H⁻¹` (`H⁻¹ = Uᵀ U`); `H` must already be dampened."""
    lower, info = torch.linalg.cholesky_ex(hessian)
    if int(info) == 0:
        upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(lower), upper=True)
    if int(info) != 0:
        raise SemisparseError(
            f"SparseGPT: the Hessian of {layer_name} is not positive definite: "
            "use a larger dampening (e.g. `percdamp`=0.1) or more calibration data (`nsamples`)"
        )
    return upper


def _unstructured_block_keep(saliency: Tensor, sparsity: float) -> Tensor:
    """Keep-mask pruning the `floor(sparsity * numel)` least salient weights of a column block."""
    keep = torch.ones_like(saliency, dtype=torch.bool)
    n_pruned = math.floor(saliency.numel() * sparsity + 1e-9)
    order = torch.argsort(saliency.flatten(), stable=True)
    keep.view(-1)[order[:n_pruned]] = False
    return keep


@torch.no_grad()
def sparsegpt_prune_weight(
    weight: Tensor,
    hessian: Tensor,
    pattern: NMPattern | None,
    sparsity: float | None,
    blocksize: int = 128,
    percdamp: float = 0.01,
    layer_name: str = "layer",
) -> Tensor:
    """Pruned and reconstructed copy of an [out, in] weight, in float32, given its [in, in] Hessian.

    N:M: at every column `j` with `j % M == 0` the `M − N` weights of each row with the smallest OBS
    saliency `w² / d²` among columns `j..j+M-1` are pruned, `d` being the diagonal of the Cholesky factor
    of `H⁻¹`. Unstructured: each column block prunes its `sparsity` fraction of least salient weights.
    """
    if pattern is None and sparsity is None:
        raise ValueError("sparsegpt_prune_weight needs a pattern or a sparsity")
    m = pattern.m if pattern is not None else 1
    if blocksize <= 0 or blocksize % m != 0:
        raise SemisparseError(
            f"SparseGPT blocksize {blocksize} must be a positive multiple of M={m}: use e.g. 128"
        )
    w_all = weight.detach().to(torch.float32).clone()
    h = hessian.detach().to(device=w_all.device, dtype=torch.float32).clone()
    cols = w_all.shape[1]

    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1
    w_all[:, dead] = 0
    torch.diagonal(h).add_(percdamp * torch.diagonal(h).mean())
    hinv = inverse_hessian_cholesky(h, layer_name)
    del h

    for start in range(0, cols, blocksize):
        end = min(start + blocksize, cols)
        w_block = w_all[:, start:end].clone()
        hinv_block = hinv[start:end, start:end]
        if pattern is None:
            q_block, err_block = _unstructured_block_sweep(w_block, hinv_block, sparsity)
        else:
            q_block, err_block = _nm_block_sweep(w_block, hinv_block, pattern.n, pattern.m)
        w_all[:, start:end] = q_block
        w_all[:, end:] -= err_block @ hinv[start:end, end:]
    return w_all


def _unstructured_block_sweep(w_block: Tensor, hinv_block: Tensor, sparsity: float) -> tuple[Tensor, Tensor]:
    """OBS over one column block whose mask is chosen up front: (pruned block, scaled errors)."""
    d = torch.diagonal(hinv_block)
    keep = _unstructured_block_keep(w_block.square() / d.square(), sparsity)
    q_block = torch.zeros_like(w_block)
    err_block = torch.zeros_like(w_block)
    for j in range(w_block.shape[1]):
        w = w_block[:, j]
        q = torch.where(keep[:, j], w, torch.zeros_like(w))
        err = (w - q) / d[j]
        w_block[:, j + 1 :] -= err.unsqueeze(1) * hinv_block[j, j + 1 :].unsqueeze(0)
        q_block[:, j] = q
        err_block[:, j] = err
    return q_block, err_block


def _nm_block_sweep(w_block: Tensor, hinv_block: Tensor, n: int, m: int) -> tuple[Tensor, Tensor]:
    """OBS over one column block, choosing each group of M columns' N:M mask when the sweep reaches it.

    The same updates as the column-by-column sweep, grouped: a kept weight has no error, so within a
    group only the pruned columns' errors matter, each corrected by the errors before it (one `addmv`),
    and the group's errors reach the later columns in one rank-M product instead of M rank-1 updates.
    1.3-2.5x faster on CPU, where the small per-column operations dominate.
    """
    d = torch.diagonal(hinv_block)
    d_squared = d.square()
    later = torch.triu(hinv_block, 1)
    q_block = torch.empty_like(w_block)
    err_block = torch.empty_like(w_block)
    err_columns = err_block.unbind(1)
    for g in range(0, w_block.shape[1], m):
        w_group = w_block[:, g : g + m]
        # Ranking NaN saliencies is moot: a NaN weight has already spread through the whole sweep.
        keep = nm.top_n_stable(w_group.square() / d_squared[g : g + m], n)
        pruned = ~keep
        scale = pruned.to(w_block.dtype).div_(d[g : g + m]).unbind(1)  # 1/d where pruned, else 0
        w_columns = w_group.unbind(1)
        err_group = err_block[:, g : g + m]
        for j in range(m):
            c = g + j
            corrected = (
                torch.addmv(w_columns[j], err_group[:, :j], later[g:c, c], alpha=-1) if j else w_columns[0]
            )
            torch.mul(corrected, scale[j], out=err_columns[c])
        w_block[:, g:].addmm_(err_group, later[g : g + m, g:], alpha=-1)
        q_block[:, g : g + m] = w_group.masked_fill(pruned, 0)
    return q_block, err_block


class SparseGPTPruner:
    """Accumulates one layer's Hessian from its forward hook, then prunes and reconstructs the layer.

    Only the upper triangle is accumulated (the Hessian is symmetric); reading `hessian` fills in the rest.
    """

    def __init__(
        self,
        module: nn.Module,
        pattern: NMPattern | None,
        sparsity: float | None,
        blocksize: int = 128,
        percdamp: float = 0.01,
        name: str = "layer",
    ) -> None:
        self.module = module
        self.pattern = pattern
        self.sparsity = sparsity
        self.blocksize = blocksize
        self.percdamp = percdamp
        self.name = name
        weight = weight_matrix(module)
        cols = weight.shape[1]
        self.hessian = torch.zeros(cols, cols, dtype=torch.float32, device=weight.device)
        self.n_samples = 0

    @property
    def hessian(self) -> Tensor:
        """The running `H = 2/n Σ_samples Σ_tokens x xᵀ` [in, in], whole (symmetrized on first read)."""
        if self._lower_stale:
            symmetrize_from_upper(self._hessian)
            self._lower_stale = False
        return self._hessian

    @hessian.setter
    def hessian(self, value: Tensor) -> None:
        self._hessian = value
        self._lower_stale = False

    def add_batch(self, inp: Tensor) -> None:
        """Fold `inp` [batch, ..., in] into the running average `H = 2/n Σ_samples Σ_tokens x xᵀ`."""
        batch = inp.shape[0] if inp.dim() > 2 else 1
        x = inp.detach().reshape(-1, inp.shape[-1]).to(device=self._hessian.device, dtype=torch.float32)
        seen, self.n_samples = self.n_samples, self.n_samples + batch
        add_upper_gram(self._hessian, x, beta=seen / self.n_samples, alpha=2 / self.n_samples)
        self._lower_stale = True

    def adopt_statistics(self, leader: SparseGPTPruner) -> None:
        """Use `leader`'s Hessian: the engine saw this layer receive the very same inputs (e.g. q/k/v)."""
        self.hessian, self.n_samples = leader.hessian, leader.n_samples

    def _check_inputs_seen(self) -> None:
        """A layer the model never called has an all-zero Hessian: pruning it would be meaningless."""
        if self.n_samples == 0:
            raise SemisparseError(
                f"SparseGPT saw no inputs for {self.name}: the model never calls it, "
                "leave it out with `exclude`"
            )

    @torch.no_grad()
    def prune(self) -> None:
        self._check_inputs_seen()
        weight = weight_matrix(self.module)
        pruned = sparsegpt_prune_weight(
            weight, self.hessian, self.pattern, self.sparsity, self.blocksize, self.percdamp, self.name
        )
        set_weight_matrix(self.module, pruned.to(weight.dtype))

    @torch.no_grad()
    def prune_together(self, followers: list[SparseGPTPruner]) -> None:
        """Prune this layer and `followers` (which adopted its Hessian) in one column sweep of their
        stacked rows: with one `H⁻¹` and an N:M pattern every row is pruned independently, so the result is
        the same as separate sweeps, at the per-column overhead of one. Unstructured sparsity ranks a whole
        column block across rows, so there each layer keeps its own sweep."""
        if self.pattern is None or not followers:
            for pruner in (self, *followers):
                pruner.prune()
            return
        self._check_inputs_seen()
        members = [self, *followers]
        weights = [weight_matrix(pruner.module) for pruner in members]
        stacked = torch.cat([weight.to(torch.float32) for weight in weights])
        names = ", ".join(pruner.name for pruner in members)
        pruned = sparsegpt_prune_weight(
            stacked, self.hessian, self.pattern, None, self.blocksize, self.percdamp, names
        )
        for pruner, weight, rows in zip(
            members, weights, pruned.split([w.shape[0] for w in weights]), strict=True
        ):
            set_weight_matrix(pruner.module, rows.to(weight.dtype))


@dataclass
class SparseGPTConfig(PrunerConfig):
    """SparseGPT: OBS pruning with reconstruction of the kept weights, one column block at a time."""

    owner: ClassVar[str] = "sparsegpt"

    blocksize: int = setting(128, "columns per lazy-update block (a multiple of M)", minimum=1)
    percdamp: float = setting(0.01, "Hessian diagonal dampening, as a fraction of its mean", minimum=0)

    def check(self) -> None:
        super().check()
        m = self.nm_pattern.m if self.nm_pattern is not None else 1
        if self.blocksize % m:
            raise SemisparseError(f"`blocksize` {self.blocksize} must be a multiple of M={m}: use e.g. 128")


@register(
    "pruner",
    "sparsegpt",
    SparseGPTConfig,
    summary="OBS pruning that also updates the kept weights",
    needs_calibration=True,
    updates_kept_weights=True,
)
def sparsegpt_pruner(name: str, module: nn.Module, config: SparseGPTConfig) -> SparseGPTPruner:
    return SparseGPTPruner(
        module, config.nm_pattern, config.sparsity, config.blocksize, config.percdamp, name
    )
