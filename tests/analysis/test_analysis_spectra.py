"""Spectral measures on matrices whose answers are known by construction."""

from __future__ import annotations

import math

import pytest
import torch

from lora_lab.analysis.spectra import (
    amplification_factor,
    effective_rank,
    energy_rank,
    projection_fraction,
    relative_error,
    singular_values,
)


def orthonormal(n: int, k: int, seed: int) -> torch.Tensor:
    """`[n, k]` with orthonormal columns, reproducible."""
    generator = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, k, generator=generator, dtype=torch.float64))
    return q


def with_spectrum(values: list[float], out: int, inp: int, seed: int = 0) -> torch.Tensor:
    """`[out, inp]` = U diag(values) Vᵀ with random orthonormal U, V."""
    k = len(values)
    u, v = orthonormal(out, k, seed), orthonormal(inp, k, seed + 1)
    return u @ torch.diag(torch.tensor(values, dtype=torch.float64)) @ v.T


def test_rank_one_plus_tiny_noise_looks_rank_one() -> None:
    generator = torch.Generator().manual_seed(0)
    u, v = torch.randn(20, 1, generator=generator), torch.randn(30, 1, generator=generator)
    delta = 3.0 * u @ v.T + 1e-6 * torch.randn(20, 30, generator=generator)
    s = singular_values(delta)
    assert s.dtype == torch.float64 and s.shape == (20,)
    assert float(s[0] / s[1]) > 100
    assert effective_rank(s) == pytest.approx(1.0, abs=0.01)
    assert energy_rank(s, 0.9) == energy_rank(s, 0.99) == 1


@pytest.mark.parametrize("k", [1, 3, 7])
def test_k_equal_singular_values_give_effective_rank_k(k: int) -> None:
    s = singular_values(with_spectrum([2.5] * k, 12, 9))
    assert effective_rank(s) == pytest.approx(k, rel=1e-6)
    assert energy_rank(s, 1.0) == k


def test_effective_rank_of_two_unequal_values() -> None:
    p = torch.tensor([3.0, 1.0]) / 4
    expected = math.exp(-float((p * p.log()).sum()))
    assert effective_rank(torch.tensor([3.0, 1.0, 0.0])) == pytest.approx(expected)
    assert effective_rank(torch.zeros(4)) == 0.0


def test_energy_rank_on_a_hand_computed_spectrum() -> None:
    # Energies 9, 4, 1 of 14: cumulative shares 0.643, 0.929, 1.
    s = torch.tensor([3.0, 2.0, 1.0])
    assert energy_rank(s, 0.5) == 1
    assert energy_rank(s, 9 / 14) == 1  # exactly reached counts
    assert energy_rank(s, 0.65) == 2
    assert energy_rank(s, 0.9) == 2
    assert energy_rank(s, 0.93) == 3
    assert energy_rank(s, 0.99) == 3
    assert energy_rank(torch.zeros(3), 0.9) == 0
    with pytest.raises(ValueError):
        energy_rank(s, 0.0)


def test_conv_update_is_flattened_to_out_by_in_kh_kw() -> None:
    # Rank 2 across [out=5, in*kh*kw=3*3*3]: two non-zero values, the rest ≈ 0.
    flat = with_spectrum([4.0, 1.0], 5, 27)
    s = singular_values(flat.reshape(5, 3, 3, 3))
    assert s.shape == (5,)
    torch.testing.assert_close(s[:2], torch.tensor([4.0, 1.0], dtype=torch.float64))
    assert float(s[2:].abs().max()) < 1e-10


def test_projection_fraction_inside_orthogonal_and_between() -> None:
    u, v = orthonormal(10, 6, 1), orthonormal(8, 6, 2)
    full = u @ torch.diag(torch.tensor([6.0, 5, 4, 3, 2, 1], dtype=torch.float64)) @ v.T
    mixing = torch.randn(3, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    inside = u[:, :3] @ mixing @ v[:, :3].T
    outside = u[:, 3:] @ mixing @ v[:, 3:].T
    assert projection_fraction(inside, full, 3) == pytest.approx(1.0)
    assert projection_fraction(outside, full, 3) == pytest.approx(0.0, abs=1e-12)
    # Equal parts along directions 1 and 3: the top-1 share is a norm ratio, 1/√2.
    half = u[:, [0]] @ v[:, [0]].T + u[:, [2]] @ v[:, [2]].T
    assert projection_fraction(half, full, 1) == pytest.approx(1 / math.sqrt(2))
    assert projection_fraction(half, full, 3) == pytest.approx(1.0)
    # A cross term u1 v2ᵀ lies in neither the top-1 nor a mismatched block.
    assert projection_fraction(u[:, [0]] @ v[:, [1]].T, full, 1) == pytest.approx(0, abs=1e-12)
    assert math.isnan(projection_fraction(torch.zeros(10, 8), full, 1))
    with pytest.raises(ValueError):
        projection_fraction(inside, full, 9)


def test_relative_error() -> None:
    full = with_spectrum([3.0, 2.0], 6, 4)
    assert relative_error(full.clone(), full) == pytest.approx(0.0, abs=1e-12)
    assert relative_error(torch.zeros_like(full), full) == pytest.approx(1.0)
    assert relative_error(2 * full, full) == pytest.approx(1.0)
    assert relative_error(0.5 * full, full) == pytest.approx(0.5)


def test_amplification_factor() -> None:
    u, v = orthonormal(6, 3, 4), orthonormal(5, 3, 5)
    weight = u @ torch.diag(torch.tensor([10.0, 1.0, 0.5], dtype=torch.float64)) @ v.T
    # ΔW along W's second direction: ‖ΔW‖ / ‖u2ᵀ W v2‖ = 4 / 1.
    delta = 4.0 * u[:, [1]] @ v[:, [1]].T
    assert amplification_factor(delta, weight, 1) == pytest.approx(4.0)
