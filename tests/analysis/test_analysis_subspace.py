"""Normalised subspace similarity φ (LoRA paper §7.2) on constructed A matrices."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lora_lab.analysis.spectra import subspace_similarity, subspace_similarity_grid

IN_DIM = 24


def basis(seed: int, n: int = IN_DIM) -> torch.Tensor:
    """A random orthonormal basis of R^n, one vector per row: `[n, n]`."""
    generator = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    return q.T


def a_from_rows(rows: torch.Tensor) -> torch.Tensor:
    """`A [r, in]` whose right singular vectors are `rows`, in order (distinct values r..1)."""
    rank = rows.shape[0]
    values = torch.arange(rank, 0, -1, dtype=torch.float64)
    generator = torch.Generator().manual_seed(rank)
    mixing, _ = torch.linalg.qr(torch.randn(rank, rank, generator=generator, dtype=torch.float64))
    return mixing @ torch.diag(values) @ rows  # U S Vᵀ with a random orthogonal U


def test_identical_a_gives_one_on_the_whole_grid() -> None:
    a = torch.randn(8, IN_DIM, generator=torch.Generator().manual_seed(0))
    grid = subspace_similarity_grid(a, a)
    assert grid.shape == (8, 8)
    torch.testing.assert_close(grid, torch.ones(8, 8, dtype=torch.float64))


def test_orthogonal_row_spaces_give_zero() -> None:
    q = basis(1)
    grid = subspace_similarity_grid(a_from_rows(q[:4]), a_from_rows(q[4:12]))
    assert grid.shape == (4, 8)
    assert float(grid.abs().max()) < 1e-12


@pytest.mark.parametrize(("rank_1", "rank_2", "shared"), [(4, 4, 2), (4, 16, 3), (8, 8, 5)])
def test_sharing_the_top_m_directions_gives_min_ijm_over_min_ij(
    rank_1: int, rank_2: int, shared: int
) -> None:
    # A1 and A2 share their top `shared` right singular vectors; the rest are orthogonal.
    q = basis(2)
    a1 = a_from_rows(q[:rank_1])
    a2 = a_from_rows(torch.cat([q[:shared], q[rank_1 : rank_1 + rank_2 - shared]]))
    grid = subspace_similarity_grid(a1, a2)
    i = torch.arange(1, rank_1 + 1, dtype=torch.float64)[:, None]
    j = torch.arange(1, rank_2 + 1, dtype=torch.float64)[None, :]
    expected = torch.minimum(torch.minimum(i, j), torch.tensor(float(shared))) / torch.minimum(i, j)
    torch.testing.assert_close(grid, expected)
    r = min(rank_1, rank_2)
    assert subspace_similarity(a1, a2, r, r) == pytest.approx(shared / r)


def test_shared_directions_lower_in_the_spectrum_count_only_once_reached() -> None:
    # A1's top vector is A2's last one: φ(1, j) stays 0 until j reaches that vector.
    q = basis(3)
    a1 = a_from_rows(q[:4])
    a2 = a_from_rows(torch.cat([q[4:7], q[:1]]))
    assert subspace_similarity(a1, a2, 1, 3) == pytest.approx(0.0, abs=1e-12)
    assert subspace_similarity(a1, a2, 1, 4) == pytest.approx(1.0)
    assert subspace_similarity(a1, a2, 4, 4) == pytest.approx(0.25)


def test_conv_a_is_compared_in_the_flattened_input_space() -> None:
    q = basis(4, 27)
    a1 = a_from_rows(q[:3]).reshape(3, 3, 3, 3)
    a2 = a_from_rows(torch.cat([q[:1], q[5:7]])).reshape(3, 3, 3, 3)
    assert subspace_similarity(a1, a2, 3, 3) == pytest.approx(1 / 3)


def test_grid_bounds_are_checked() -> None:
    a = torch.randn(4, IN_DIM)
    with pytest.raises(ValueError):
        subspace_similarity_grid(a, a, max_i=5)
    with pytest.raises(ValueError):
        subspace_similarity_grid(a, torch.randn(4, IN_DIM + 1))
    # A wider-than-tall A has only `in` right singular vectors.
    assert subspace_similarity_grid(torch.randn(6, 4), torch.randn(6, 4)).shape == (4, 4)


random_pair = st.tuples(st.integers(1, 8), st.integers(1, 8), st.integers(0, 2**31 - 1))


def random_a(rank: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randn(rank, IN_DIM, generator=generator, dtype=torch.float64)


@settings(max_examples=25, deadline=None)
@given(random_pair)
def test_phi_is_symmetric_under_swapping_the_arguments(case: tuple[int, int, int]) -> None:
    rank_1, rank_2, seed = case
    generator = torch.Generator().manual_seed(seed)
    a1, a2 = random_a(rank_1, generator), random_a(rank_2, generator)
    grid = subspace_similarity_grid(a1, a2)
    torch.testing.assert_close(grid, subspace_similarity_grid(a2, a1).T)
    assert float(grid.min()) >= 0.0 and float(grid.max()) <= 1.0


@settings(max_examples=25, deadline=None)
@given(random_pair, st.floats(1e-3, 1e3))
def test_phi_is_invariant_to_scaling_and_rotating_a(
    case: tuple[int, int, int], scale: float
) -> None:
    rank_1, rank_2, seed = case
    generator = torch.Generator().manual_seed(seed)
    a1, a2 = random_a(rank_1, generator), random_a(rank_2, generator)
    rotation, _ = torch.linalg.qr(torch.randn(rank_1, rank_1, generator=generator).double())
    # Orthogonal R and scalars keep the singular vectors and their order: the whole grid holds.
    reference = subspace_similarity_grid(a1, a2)
    torch.testing.assert_close(subspace_similarity_grid(scale * rotation @ a1, a2), reference)


@settings(max_examples=25, deadline=None)
@given(random_pair)
def test_full_subspace_phi_only_sees_the_row_space(case: tuple[int, int, int]) -> None:
    # A general invertible R reorders the singular directions, so only φ at i = r
    # (the whole row space) is invariant; R A itself spans exactly A's row space.
    rank_1, rank_2, seed = case
    generator = torch.Generator().manual_seed(seed)
    a1, a2 = random_a(rank_1, generator), random_a(rank_2, generator)
    mixing = torch.randn(rank_1, rank_1, generator=generator, dtype=torch.float64)
    mixing = mixing + rank_1 * torch.eye(rank_1, dtype=torch.float64)  # well conditioned
    mixed = mixing @ a1
    assert subspace_similarity(mixed, a1, rank_1, rank_1) == pytest.approx(1.0)
    for j in range(1, rank_2 + 1):
        assert subspace_similarity(mixed, a2, rank_1, j) == pytest.approx(
            subspace_similarity(a1, a2, rank_1, j), abs=1e-9
        )
