"""Spectra and subspace measures of weight updates (LoRA paper, Hu et al. 2021, §7).

Pure functions on tensors. Every decomposition runs in float64: the quantities of interest
(σ1/σ2 ratios above 100, similarities near 0 or 1) sit where float32 round-off is visible.

Conv weights `[out, in, kh, kw]` are read as matrices `[out, in*kh*kw]`, the same flattening
a LoRA conv adapter uses (A is a conv of the base kernel, B a 1×1 conv), so the rank of the
flattened matrix is the adapter's rank. A LoRA update itself is never formed here: ΔW comes
from the core (`lora_lab.lora.lora_delta_weight`).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

# Relative slack when comparing cumulative energy to a target fraction, so that a
# fraction hit exactly (e.g. 9/14 of [3, 2, 1]) is not missed by one rounding step.
_ENERGY_SLACK = 1e-12


def as_matrix(weight: Tensor) -> Tensor:
    """Views a weight or update as a float64 matrix.

    Args:
        weight: `[out, in]`, or a conv kernel `[out, in, kh, kw]` (any ndim >= 2).

    Returns:
        `[out, in*kh*kw]` in float64.
    """
    if weight.ndim < 2:
        raise ValueError(f"expected a weight with ndim >= 2, got shape {tuple(weight.shape)}")
    return weight.detach().reshape(weight.shape[0], -1).to(torch.float64)


def singular_values(delta: Tensor) -> Tensor:
    """Singular values of a weight update, largest first.

    Args:
        delta: `[out, in]` or `[out, in, kh, kw]` (flattened to `[out, in*kh*kw]`).

    Returns:
        `[min(out, in*kh*kw)]` float64, non-increasing.
    """
    return torch.linalg.svdvals(as_matrix(delta))


def effective_rank(singular: Tensor) -> float:
    """Entropy effective rank (Roy & Vetterli 2007): exp(H(p)) with p = s / Σs.

    Args:
        singular: `[k]` non-negative singular values.

    Returns:
        A value in [1, k]; k for k equal non-zero values, ≈1 for one dominant value,
        0.0 for an all-zero spectrum (a zero update has no directions).
    """
    s = singular.detach().to(torch.float64).clamp_min(0)
    total = s.sum()
    if total <= 0:
        return 0.0
    p = s / total
    p = p[p > 0]  # 0·log 0 = 0 by continuity
    return math.exp(float(-(p * p.log()).sum()))


def energy_rank(singular: Tensor, fraction: float) -> int:
    """How many leading singular values hold `fraction` of the energy Σs².

    Args:
        singular: `[k]` singular values, largest first.
        fraction: target share of Σs², in (0, 1].

    Returns:
        The smallest n with Σ_{i<=n} s_i² >= fraction · Σ s_i²; 0 for an all-zero spectrum.
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must lie in (0, 1], got {fraction}")
    energy = singular.detach().to(torch.float64) ** 2
    total = energy.sum()
    if total <= 0:
        return 0
    cumulative = energy.cumsum(0) / total
    reached = cumulative >= fraction - _ENERGY_SLACK
    return int(torch.nonzero(reached)[0, 0]) + 1


def right_singular_vectors(a: Tensor) -> Tensor:
    """Right singular vectors of a LoRA `A`, i.e. an orthonormal basis of its row space.

    Args:
        a: `[r, in]` or a conv `A` `[r, in, kh, kw]`.

    Returns:
        `[min(r, d), d]` with d = in (or in*kh*kw); row k is the k-th right singular
        vector, ordered by decreasing singular value.
    """
    _, _, vh = torch.linalg.svd(as_matrix(a), full_matrices=False)
    return vh


def subspace_similarity_grid(
    a1: Tensor, a2: Tensor, max_i: int | None = None, max_j: int | None = None
) -> Tensor:
    """φ(A1, A2, i, j) for every i <= max_i, j <= max_j (LoRA paper, eq. 4, §7.2).

    φ = ‖U1^{i ᵀ} U2^{j}‖²_F / min(i, j), where U^i holds the top-i right singular vectors.
    All entries come from one product M = U1ᵀU2: ‖U1^{iᵀ}U2^j‖²_F is the sum of M² over the
    leading i×j block, i.e. a 2-D cumulative sum.

    Args:
        a1: `[r1, in]` (or conv `[r1, in, kh, kw]`).
        a2: `[r2, in]`, same input space as `a1`.
        max_i: rows of the grid; defaults to (and may not exceed) min(r1, in).
        max_j: columns of the grid; defaults to (and may not exceed) min(r2, in).

    Returns:
        `[max_i, max_j]` float64 in [0, 1]; entry [i-1, j-1] is φ(A1, A2, i, j).
    """
    return similarity_grid_from_bases(
        right_singular_vectors(a1), right_singular_vectors(a2), max_i, max_j
    )


def similarity_grid_from_bases(
    v1: Tensor, v2: Tensor, max_i: int | None = None, max_j: int | None = None
) -> Tensor:
    """`subspace_similarity_grid` from precomputed right singular vectors.

    Args:
        v1: `[k1, in]` orthonormal rows, most important first (`right_singular_vectors`).
        v2: `[k2, in]`.
        max_i: defaults to k1.
        max_j: defaults to k2.

    Returns:
        `[max_i, max_j]`, entry [i-1, j-1] = φ(i, j).
    """
    if v1.shape[1] != v2.shape[1]:
        raise ValueError(f"A1 and A2 act on different input spaces: {v1.shape[1]} vs {v2.shape[1]}")
    max_i = v1.shape[0] if max_i is None else max_i
    max_j = v2.shape[0] if max_j is None else max_j
    if not (1 <= max_i <= v1.shape[0] and 1 <= max_j <= v2.shape[0]):
        raise ValueError(
            f"grid {max_i}x{max_j} outside 1..{v1.shape[0]} x 1..{v2.shape[0]} "
            "(at most min(rank, input dim) singular vectors exist)"
        )
    overlap = (v1[:max_i] @ v2[:max_j].T) ** 2  # [max_i, max_j]
    captured = overlap.cumsum(0).cumsum(1)
    i = torch.arange(1, max_i + 1, dtype=torch.float64)[:, None]
    j = torch.arange(1, max_j + 1, dtype=torch.float64)[None, :]
    # Round-off can push a perfect overlap a hair above 1.
    return (captured / torch.minimum(i, j)).clamp(0.0, 1.0)


def subspace_similarity(a1: Tensor, a2: Tensor, i: int, j: int) -> float:
    """φ(A1, A2, i, j): overlap of the top-i and top-j right singular subspaces.

    Args:
        a1: `[r1, in]` (or conv `[r1, in, kh, kw]`).
        a2: `[r2, in]`.
        i: how many top right singular vectors of `a1`, 1 <= i <= min(r1, in).
        j: how many of `a2`, 1 <= j <= min(r2, in).

    Returns:
        φ in [0, 1]: 1 when one subspace contains the other, 0 when they are orthogonal.
    """
    return float(subspace_similarity_grid(a1, a2, i, j)[i - 1, j - 1])


def projection_fraction(delta_lora: Tensor, delta_full: Tensor, k: int) -> float:
    """Share of a LoRA update lying in the top-k directions of the full-finetune update.

    Returns ‖U_kᵀ ΔW_lora V_k‖_F / ‖ΔW_lora‖_F, with U_k `[out, k]` and V_k `[in, k]` the top-k
    left and right singular vectors of ΔW_full. A norm ratio (not squared): 1 inside the
    subspace, 0 orthogonal to it.

    Args:
        delta_lora: `[out, in]` (or conv `[out, in, kh, kw]`).
        delta_full: same shape as `delta_lora`.
        k: 1 <= k <= min(out, in).

    Returns:
        A value in [0, 1]; NaN when ΔW_lora is zero (nothing to project).
    """
    lora, full = as_matrix(delta_lora), as_matrix(delta_full)
    if lora.shape != full.shape:
        raise ValueError(f"shape mismatch: {tuple(lora.shape)} vs {tuple(full.shape)}")
    if not 1 <= k <= min(full.shape):
        raise ValueError(f"k must lie in 1..{min(full.shape)}, got {k}")
    u, _, vh = torch.linalg.svd(full, full_matrices=False)
    return share_in_subspace(lora, u[:, :k], vh[:k].T)


def share_in_subspace(delta: Tensor, left: Tensor, right: Tensor) -> float:
    """‖leftᵀ ΔW right‖_F / ‖ΔW‖_F for orthonormal bases `left`, `right`.

    The core of `projection_fraction`, for callers that reuse one SVD of ΔW_full across
    many LoRA updates.

    Args:
        delta: `[out, in]` (or conv `[out, in, kh, kw]`).
        left: `[out, k]` orthonormal columns.
        right: `[in, k]` orthonormal columns (in = in*kh*kw for a conv).

    Returns:
        A value in [0, 1]; NaN when ΔW is zero.
    """
    matrix = as_matrix(delta)
    k = left.shape[1]
    if not 1 <= k <= min(matrix.shape) or right.shape != (matrix.shape[1], k):
        raise ValueError(
            f"bases {tuple(left.shape)}, {tuple(right.shape)} do not fit ΔW "
            f"{tuple(matrix.shape)} with 1 <= k <= {min(matrix.shape)}"
        )
    norm = torch.linalg.matrix_norm(matrix)
    if norm == 0:
        return math.nan
    projected = left.to(torch.float64).T @ matrix @ right.to(torch.float64)  # [k, k]
    return float(torch.linalg.matrix_norm(projected) / norm)


def relative_error(delta_lora: Tensor, delta_full: Tensor) -> float:
    """‖ΔW_lora − ΔW_full‖_F / ‖ΔW_full‖_F.

    Args:
        delta_lora: `[out, in]` (or conv `[out, in, kh, kw]`).
        delta_full: same shape.

    Returns:
        0 for equal updates, 1 for a zero LoRA update; NaN when ΔW_full is zero.
    """
    lora, full = as_matrix(delta_lora), as_matrix(delta_full)
    if lora.shape != full.shape:
        raise ValueError(f"shape mismatch: {tuple(lora.shape)} vs {tuple(full.shape)}")
    full_norm = torch.linalg.matrix_norm(full)
    if full_norm == 0:
        return math.nan
    return float(torch.linalg.matrix_norm(lora - full) / full_norm)


def amplification_factor(delta: Tensor, weight: Tensor, k: int) -> float:
    """§7.3 of the paper: how strongly ΔW amplifies directions already present in W.

    Returns ‖ΔW‖_F / ‖U_kᵀ W V_k‖_F with U_k, V_k the top-k singular vectors of ΔW itself
    (the paper uses k = r). Large values mean ΔW boosts directions that W barely uses.

    Args:
        delta: `[out, in]` (or conv `[out, in, kh, kw]`).
        weight: the pre-trained W, same shape.
        k: 1 <= k <= min(out, in).

    Returns:
        The factor; inf when W has no component in those directions.
    """
    d, w = as_matrix(delta), as_matrix(weight)
    if d.shape != w.shape:
        raise ValueError(f"shape mismatch: {tuple(d.shape)} vs {tuple(w.shape)}")
    if not 1 <= k <= min(d.shape):
        raise ValueError(f"k must lie in 1..{min(d.shape)}, got {k}")
    u, s, vh = torch.linalg.svd(d, full_matrices=False)
    return amplification_from_svd(w, u[:, :k], vh[:k].T, float(s.square().sum().sqrt()))


def amplification_from_svd(weight: Tensor, left: Tensor, right: Tensor, delta_norm: float) -> float:
    """`amplification_factor` given ΔW's top-k bases `left` `[out, k]`, `right` `[in, k]`."""
    share = share_in_subspace(weight, left, right)  # ‖U_kᵀ W V_k‖ / ‖W‖
    inside = share * float(torch.linalg.matrix_norm(as_matrix(weight)))
    if inside == 0 or math.isnan(inside):
        return math.inf
    return delta_norm / inside
