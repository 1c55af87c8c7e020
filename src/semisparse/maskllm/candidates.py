"""The C(M, N) candidate masks of one group of M weights, the choices MaskLLM learns a distribution over.

Order (fixed, relied on by saved logits and checkpoints): candidate `i` keeps the positions of the `i`-th
combination of `itertools.combinations(range(M), N)`, i.e. lexicographic order of the kept positions.
For 2:4 that is {0,1}, {0,2}, {0,3}, {1,2}, {1,3}, {2,3}.
"""

from __future__ import annotations

import itertools
import math

import torch

from semisparse.nm import NMPattern


def candidate_count(pattern: NMPattern) -> int:
    """C(M, N): how many logits each group of M weights carries."""
    return math.comb(pattern.m, pattern.n)


def candidate_masks(pattern: NMPattern, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[C(M, N), M] tensor, row i = the i-th candidate (1 = kept), in the documented order."""
    rows = torch.zeros(candidate_count(pattern), pattern.m, dtype=dtype)
    for index, kept in enumerate(itertools.combinations(range(pattern.m), pattern.n)):
        rows[index, list(kept)] = 1
    return rows


def overlaps(mask: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """⟨mask group, S_i⟩ for every group and candidate: [out, in] mask -> [out, in/M, C] counts (fp32)."""
    m = candidates.shape[1]
    groups = mask.reshape(mask.shape[0], -1, m).to(torch.float32)
    return groups @ candidates.to(device=mask.device, dtype=torch.float32).T


def matching_candidate(mask: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """Index of the candidate with the largest overlap with each group of `mask` ([out, in/M], int64).

    For a group that is itself a candidate this is that candidate; a group with fewer than N kept entries
    maps to the first candidate containing them (ties keep the lower index).
    """
    return overlaps(mask, candidates).argmax(-1)
