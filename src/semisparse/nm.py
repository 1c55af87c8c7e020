"""N:M mask core: which weights survive in every group of M consecutive entries.

Every pruner funnels its scores through `nm_mask` or `unstructured_mask`, so these are vectorised (no
Python loop over groups or columns) and deterministic: on equal scores the lower index is kept, and NaN
scores rank as -inf, so a group always keeps exactly N entries whatever the scores are.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np
import torch

from semisparse.errors import SemisparseError

_PATTERN_RE = re.compile(r"\s*(\d+)\s*:\s*(\d+)\s*")

# Below this many scores (or for wide groups) one stable sort beats the pairwise kernel's per-op overhead;
# SparseGPT calls `nm_mask` once per group of columns, so the small case is hot too.
_PAIRWISE_MIN_NUMEL = 1 << 13
_PAIRWISE_MAX_M = 8


@dataclass(frozen=True)
class NMPattern:
    """Keep `n` of every `m` consecutive weights along the input dimension (2:4 is what GPUs accelerate)."""

    n: int
    m: int

    def __post_init__(self) -> None:
        if self.n < 1:
            raise SemisparseError(f"pattern '{self}' is invalid: N must be at least 1 (e.g. 2:4)")
        if self.n >= self.m:
            raise SemisparseError(f"pattern '{self}' is invalid: N must be smaller than M (e.g. 2:4)")

    def __str__(self) -> str:
        return f"{self.n}:{self.m}"

    @property
    def sparsity(self) -> float:
        """Fraction of weights the pattern removes."""
        return 1 - self.n / self.m


def parse_pattern(text: str) -> NMPattern:
    """Parse "N:M" as typed by a user (e.g. on the command line) into a validated `NMPattern`."""
    match = _PATTERN_RE.fullmatch(text)
    if match is None:
        raise SemisparseError(
            f"pattern '{text}' is invalid: write it as N:M with whole numbers and N < M (e.g. 2:4)"
        )
    return NMPattern(int(match.group(1)), int(match.group(2)))


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Boolean mask keeping the `n` highest scores in every group of `m` consecutive entries of the last dim.

    Exactly `n` entries per group are True; ties keep the lower index and NaN ranks as -inf.
    """
    if not 0 <= n <= m or m < 1:
        raise ValueError(f"need 0 <= n <= m and m >= 1, got n={n}, m={m}")
    if scores.dim() == 0 or scores.shape[-1] % m != 0:
        raise ValueError(f"last dimension of shape {tuple(scores.shape)} is not a multiple of m={m}")
    scores = _nan_lowest(scores)
    groups = scores.reshape(*scores.shape[:-1], -1, m)
    if m <= _PAIRWISE_MAX_M and scores.numel() >= _PAIRWISE_MIN_NUMEL:
        keep = _pairwise_keep(groups, n)
    else:
        keep = top_n_stable(groups, n)
    return keep.reshape(scores.shape)


def _nan_lowest(scores: torch.Tensor) -> torch.Tensor:
    """Map NaN to -inf so scores are totally ordered; otherwise a group could keep more or fewer than N.

    On CPU a NaN-propagating sum (a fraction of a pass, no output) skips the copy for the usual clean
    scores; on GPUs the copy is cheap and the check would cost a host sync per call.
    """
    if not scores.is_floating_point():
        return scores
    if scores.device.type == "cpu" and not scores.sum().isnan():
        return scores
    return torch.nan_to_num(scores, nan=-math.inf, posinf=math.inf, neginf=-math.inf)


def _pairwise_keep(groups: torch.Tensor, n: int) -> torch.Tensor:
    """Rank each entry of [..., g, m] by counting the group members that beat it; keep ranks below n.

    One comparison per pair of positions, on [..., g] slices: for small m this is a few elementwise
    passes, several times faster than topk/sort on CPU. Entry j beats k (j < k) when s_j >= s_k.
    """
    m = groups.shape[-1]
    cols = groups.unbind(-1)
    beaten_by = [torch.zeros(cols[0].shape, dtype=torch.uint8, device=groups.device) for _ in range(m)]
    for j in range(m):
        for k in range(j + 1, m):
            j_wins = cols[j] >= cols[k]
            beaten_by[k] += j_wins
            beaten_by[j] += ~j_wins
    keep = torch.empty(groups.shape, dtype=torch.bool, device=groups.device)
    for j in range(m):
        torch.lt(beaten_by[j], n, out=keep[..., j])
    return keep


def top_n_stable(groups: torch.Tensor, n: int) -> torch.Tensor:
    """Keep the first n of a stable descending sort of the last dim: equal scores keep their order, so the
    lower index wins. No NaN handling (`nm_mask` ranks NaN lowest): for scores known to be clean."""
    order = groups.sort(dim=-1, descending=True, stable=True).indices
    keep = torch.zeros(groups.shape, dtype=torch.bool, device=groups.device)
    return keep.scatter_(-1, order[..., :n], True)


def unstructured_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Per row (last dim), prune the floor(sparsity * cols) lowest scores; ties keep the lower index."""
    if not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"sparsity must be in [0, 1], got {sparsity}")
    if scores.dim() == 0:
        raise ValueError("scores must have at least one dimension")
    cols = scores.shape[-1]
    # The epsilon absorbs binary rounding (0.29 * 100 = 28.999...) so decimal ratios prune what they say.
    n_pruned = math.floor(sparsity * cols + 1e-9)
    return (
        nm_mask(scores, cols - n_pruned, cols) if cols else scores.new_zeros(scores.shape, dtype=torch.bool)
    )


def is_nm(weight: torch.Tensor, n: int, m: int, *, exact: bool = False) -> bool:
    """Whether every group of m along the last dim has at most n non-zeros (False if width % m != 0).

    The one N:M rule for weights and masks alike (a bool mask's non-zeros are its kept entries). With
    `exact`, every group must have exactly n: what a keep-mask of the pattern holds, where a weight may
    have fewer non-zeros than it keeps.
    """
    if weight.dim() == 0 or weight.shape[-1] % m != 0:
        return False
    nonzeros = (weight != 0).reshape(*weight.shape[:-1], -1, m).sum(-1)
    return bool((nonzeros == n).all() if exact else (nonzeros <= n).all())


def sparsity(weight: torch.Tensor) -> float:
    """Fraction of entries that are exactly zero (0.0 for an empty tensor)."""
    if weight.numel() == 0:
        return 0.0
    return float((weight == 0).sum().item() / weight.numel())


def pack_mask(mask: torch.Tensor) -> np.ndarray:
    """Store a bool mask at one bit per entry (uint8), flattened in row-major order."""
    if mask.dtype != torch.bool:
        raise ValueError(f"pack_mask needs a bool mask, got {mask.dtype}")
    return np.packbits(mask.detach().cpu().reshape(-1).numpy())


def unpack_mask(packed: np.ndarray, shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of `pack_mask`: the bool mask of the given shape."""
    count = math.prod(shape)
    if packed.shape != ((count + 7) // 8,):
        raise ValueError(f"packed mask has shape {packed.shape}, expected ({(count + 7) // 8},) for {shape}")
    bits = np.unpackbits(packed, count=count).astype(bool)
    return torch.from_numpy(bits).reshape(shape)
