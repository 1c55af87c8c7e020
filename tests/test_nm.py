"""The N:M mask core against a plain per-group reference, on random shapes, patterns and ties."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from semisparse import nm
from semisparse.errors import SemisparseError

PATHS = ("sort", "pairwise")


@pytest.fixture(params=PATHS)
def path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test through each kernel of `nm_mask`: force the pairwise one even on tiny inputs."""
    if request.param == "pairwise":
        monkeypatch.setattr(nm, "_PAIRWISE_MIN_NUMEL", 0)
    else:
        monkeypatch.setattr(nm, "_PAIRWISE_MIN_NUMEL", math.inf)
    return request.param


def reference_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Per group: keep the n highest scores, lower index first among equals, NaN lowest."""
    flat = scores.reshape(-1, scores.shape[-1]).tolist()
    keep = []
    for row in flat:
        out = [False] * len(row)
        for start in range(0, len(row), m):
            group = range(start, start + m)
            key = [(-math.inf if math.isnan(row[i]) else row[i], -i) for i in group]
            ranked = sorted(zip(key, group, strict=True), reverse=True)
            for _, i in ranked[:n]:
                out[i] = True
        keep.append(out)
    return torch.tensor(keep, dtype=torch.bool).reshape(scores.shape)


@st.composite
def scores_and_pattern(draw: st.DrawFn, ties: bool = False) -> tuple[torch.Tensor, int, int]:
    m = draw(st.sampled_from([1, 2, 4, 8, 16]))
    n = draw(st.integers(0, m))
    lead = draw(st.lists(st.integers(1, 4), min_size=0, max_size=2))
    groups = draw(st.integers(1, 5))
    seed = draw(st.integers(0, 2**31 - 1))
    generator = torch.Generator().manual_seed(seed)
    shape = (*lead, groups * m)
    if ties:
        scores = torch.randint(0, 3, shape, generator=generator).float()
    else:
        scores = torch.randn(shape, generator=generator)
    if draw(st.booleans()):
        specials = torch.tensor([math.nan, math.inf, -math.inf])
        where = torch.rand(shape, generator=generator) < 0.3
        picks = torch.randint(0, 3, shape, generator=generator)
        scores = torch.where(where, specials[picks], scores)
    return scores, n, m


@pytest.mark.parametrize("ties", [False, True])
def test_nm_mask_matches_reference(path: str, ties: bool) -> None:
    @settings(max_examples=60, deadline=None)
    @given(scores_and_pattern(ties=ties))
    def check(case: tuple[torch.Tensor, int, int]) -> None:
        scores, n, m = case
        mask = nm.nm_mask(scores, n, m)
        assert mask.dtype == torch.bool and mask.shape == scores.shape
        per_group = mask.reshape(*scores.shape[:-1], -1, m).sum(-1)
        assert (per_group == n).all()
        assert torch.equal(mask, reference_mask(scores, n, m))

    check()


def test_all_equal_scores_keep_lowest_indices(path: str) -> None:
    mask = nm.nm_mask(torch.ones(3, 8), 2, 4)
    assert mask[0].tolist() == [True, True, False, False] * 2
    assert torch.equal(mask, mask[:1].expand(3, 8))


def test_nan_scores_rank_lowest_and_group_stays_exact(path: str) -> None:
    nan, inf = math.nan, math.inf
    scores = torch.tensor([[nan, 1.0, nan, -inf, nan, nan, nan, nan, 0.5, nan, 2.0, nan]])
    mask = nm.nm_mask(scores, 2, 4)
    # NaN counts as -inf: it ties with -inf (lower index wins) and loses to every other score.
    assert mask[0].tolist() == [True, True, False, False, True, True, False, False, True, False, True, False]
    assert torch.equal(mask, reference_mask(scores, 2, 4))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64, torch.int32, torch.int64])
def test_dtypes_agree_with_float32(path: str, dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    scores = torch.randint(-50, 50, (6, 32)).float()
    assert torch.equal(nm.nm_mask(scores.to(dtype), 2, 4), nm.nm_mask(scores, 2, 4))


def test_large_input_uses_pairwise_and_matches_sort() -> None:
    torch.manual_seed(0)
    scores = torch.randn(256, 512)
    assert scores.numel() >= nm._PAIRWISE_MIN_NUMEL
    for n, m in [(2, 4), (1, 4), (4, 8), (3, 8)]:
        groups = scores.reshape(256, -1, m)
        assert torch.equal(nm.nm_mask(scores, n, m), nm.top_n_stable(groups, n).reshape(256, 512))


def test_non_contiguous_scores() -> None:
    torch.manual_seed(0)
    scores = torch.randn(16, 12).t()
    assert torch.equal(nm.nm_mask(scores, 2, 4), reference_mask(scores.contiguous(), 2, 4))


@pytest.mark.parametrize("shape", [(3, 10), (6,), ()])
def test_nm_mask_rejects_width_not_multiple_of_m(shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match="multiple of m=4"):
        nm.nm_mask(torch.randn(shape), 2, 4)


@pytest.mark.parametrize(("n", "m"), [(5, 4), (-1, 4), (0, 0)])
def test_nm_mask_rejects_bad_n_m(n: int, m: int) -> None:
    with pytest.raises(ValueError, match="0 <= n <= m"):
        nm.nm_mask(torch.randn(2, 8), n, m)


@settings(max_examples=60, deadline=None)
@given(scores_and_pattern())
def test_is_nm_true_for_masked_and_false_when_a_group_has_too_many(
    case: tuple[torch.Tensor, int, int],
) -> None:
    scores, n, m = case
    weight = scores.nan_to_num(0.0) + 10.0  # no accidental zeros
    pruned = weight * nm.nm_mask(scores, n, m)
    assert nm.is_nm(pruned, n, m)
    if n < m:
        overfull = pruned.clone()
        overfull.reshape(-1, m)[-1, : n + 1] = 1.0
        assert not nm.is_nm(overfull, n, m)


def test_is_nm_counts_non_zeros_not_positions() -> None:
    weight = torch.tensor([[0.0, 3.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0]])
    assert nm.is_nm(weight, 2, 4)
    assert nm.is_nm(weight, 2, 8)
    assert not nm.is_nm(weight, 1, 4)
    assert not nm.is_nm(torch.zeros(2, 6), 2, 4)


def test_is_nm_exact_needs_n_in_every_group() -> None:
    mask = torch.tensor([[True, False, True, False, False, True, True, False]])
    assert nm.is_nm(mask, 2, 4, exact=True) and nm.is_nm(mask, 2, 4)
    short = mask.clone()
    short[0, 0] = False
    assert nm.is_nm(short, 2, 4) and not nm.is_nm(short, 2, 4, exact=True)
    assert not nm.is_nm(torch.ones(1, 6, dtype=torch.bool), 3, 4, exact=True)


def test_sparsity_fraction_of_exact_zeros() -> None:
    assert nm.sparsity(torch.tensor([0.0, 1e-30, -0.0, 2.0])) == 0.5
    assert nm.sparsity(torch.zeros(3, 4)) == 1.0
    assert nm.sparsity(torch.empty(0)) == 0.0


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.integers(1, 13), min_size=1, max_size=3),
    st.integers(0, 100),
    st.booleans(),
    st.integers(0, 2**31 - 1),
)
def test_unstructured_prunes_exact_count_per_row(
    shape: list[int], percent: int, ties: bool, seed: int
) -> None:
    generator = torch.Generator().manual_seed(seed)
    if ties:
        scores = torch.randint(0, 3, shape, generator=generator).float()
    else:
        scores = torch.randn(shape, generator=generator)
    ratio = percent / 100
    cols = shape[-1]
    n_pruned = math.floor(Fraction(percent, 100) * cols)
    mask = nm.unstructured_mask(scores, ratio)
    assert (mask.sum(-1) == cols - n_pruned).all()
    assert torch.equal(mask, reference_mask(scores, cols - n_pruned, cols))


def test_unstructured_decimal_ratio_is_not_lost_to_rounding() -> None:
    assert 0.29 * 100 < 29
    mask = nm.unstructured_mask(torch.randn(4, 100), 0.29)
    assert (mask.sum(-1) == 71).all()


@pytest.mark.parametrize("ratio", [-0.1, 1.5])
def test_unstructured_rejects_bad_ratio(ratio: float) -> None:
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        nm.unstructured_mask(torch.randn(2, 8), ratio)


@settings(max_examples=80, deadline=None)
@given(st.lists(st.integers(0, 11), min_size=0, max_size=3), st.integers(0, 2**31 - 1))
def test_pack_unpack_round_trip(shape: list[int], seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    mask = torch.rand(shape, generator=generator) < 0.5
    packed = nm.pack_mask(mask)
    assert packed.dtype == np.uint8
    assert packed.shape == ((mask.numel() + 7) // 8,)
    assert torch.equal(nm.unpack_mask(packed, tuple(shape)), mask)


def test_pack_is_packbits_of_row_major_bits() -> None:
    mask = torch.tensor([[True, False, True], [True, True, False], [False, False, True]])
    assert nm.pack_mask(mask).tolist() == [0b10111000, 0b10000000]


def test_pack_rejects_non_bool_and_unpack_rejects_wrong_length() -> None:
    with pytest.raises(ValueError, match="bool"):
        nm.pack_mask(torch.ones(4))
    with pytest.raises(ValueError, match="expected"):
        nm.unpack_mask(np.zeros(3, dtype=np.uint8), (4, 4))


@pytest.mark.parametrize(("text", "n", "m"), [("2:4", 2, 4), ("1:4", 1, 4), ("4:8", 4, 8), (" 2 : 4 ", 2, 4)])
def test_parse_pattern_accepts(text: str, n: int, m: int) -> None:
    pattern = nm.parse_pattern(text)
    assert (pattern.n, pattern.m) == (n, m)
    assert str(pattern) == f"{n}:{m}"
    assert pattern.sparsity == pytest.approx(1 - n / m)


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("5:4", "smaller than M"),
        ("4:4", "smaller than M"),
        ("0:4", "at least 1"),
        ("2:x", "N:M"),
        ("", "N:M"),
        ("2:4:8", "N:M"),
        ("-2:4", "N:M"),
    ],
)
def test_parse_pattern_rejects(text: str, reason: str) -> None:
    with pytest.raises(SemisparseError, match=reason) as info:
        nm.parse_pattern(text)
    message = str(info.value)
    assert "\n" not in message and f"'{text}'" in message and "e.g. 2:4" in message


def test_pattern_is_validated_when_built_directly() -> None:
    with pytest.raises(SemisparseError, match="smaller than M"):
        nm.NMPattern(4, 2)
