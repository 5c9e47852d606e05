"""The measurements of the analysis: rows of the long `analysis.csv`, one builder per `kind`.

Each builder returns plain dicts; `build_table` fixes the column order and dtypes, so the
three kinds share one CSV in which a column a kind does not use is empty. Layers are named as
in the network (`hidden.0`), which is how both the weights files and the adapters name them.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from itertools import combinations

import pandas as pd
import torch
from torch import Tensor

from lora_lab.analysis.adapters import AdapterRun, LayerUpdate
from lora_lab.analysis.spectra import (
    amplification_from_svd,
    as_matrix,
    effective_rank,
    energy_rank,
    relative_error,
    share_in_subspace,
    similarity_grid_from_bases,
)
from lora_lab.results import round_metric

SPECTRUM, LORA_VS_FULL, SUBSPACE = "spectrum", "lora_vs_full", "subspace"

SPECTRUM_COLUMNS = [
    "adapted", "full_rank", "fro_norm", "weight_fro_norm", "relative_update",
    "sigma1", "sigma2", "sigma1_over_sigma2", "effective_rank", "rank90", "rank99",
]  # fmt: skip
LORA_VS_FULL_COLUMNS = [
    "adapter", "rank", "seed", "alpha", "scaling", "k_top_r", "proj_top1", "proj_top_r",
    "relative_error", "norm_ratio", "amplification", "test_acc",
]  # fmt: skip
SUBSPACE_COLUMNS = [
    "adapter_a", "rank_a", "seed_a", "adapter_b", "rank_b", "seed_b",
    "grid_size", "phi_top1", "phi_mean", "phi_full",
]  # fmt: skip
COLUMNS = ["kind", "layer", "shape", *SPECTRUM_COLUMNS, *LORA_VS_FULL_COLUMNS, *SUBSPACE_COLUMNS]
_INT_COLUMNS = [
    "full_rank", "rank90", "rank99", "rank", "seed", "k_top_r",
    "rank_a", "seed_a", "rank_b", "seed_b", "grid_size",
]  # fmt: skip


def natural_sorted(names: list[str]) -> list[str]:
    """Sorts layer names the way a reader expects (`hidden.2` before `hidden.10`)."""
    return sorted(names, key=_natural_key)


def _natural_key(text: str) -> list[int | str]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def weight_layers(state: dict[str, Tensor]) -> dict[str, str]:
    """Layer name -> state-dict key for every 2-D (linear, embedding) or 4-D (conv) weight.

    1-D tensors (biases, norm scales) and integer buffers carry no matrix spectrum.
    """
    return {
        key.removesuffix(".weight"): key
        for key, tensor in state.items()
        if tensor.ndim in (2, 4) and tensor.is_floating_point()
    }


def _shape(tensor: Tensor) -> str:
    return "x".join(str(size) for size in tensor.shape)


def _ratio(numerator: float, denominator: float) -> float:
    if denominator == 0:
        return math.nan if numerator == 0 else math.inf
    return numerator / denominator


@dataclass(frozen=True)
class FullUpdate:
    """ΔW_full of one layer with its SVD, computed once and shared by all comparisons.

    Attributes:
        delta: `[out, in]` or `[out, in, kh, kw]`, float64.
        weight: the pre-trained W, same shape.
        u: `[out, n]` left singular vectors, n = min(out, in*kh*kw).
        s: `[n]` singular values, largest first.
        v: `[in*kh*kw, n]` right singular vectors.
    """

    delta: Tensor
    weight: Tensor
    u: Tensor
    s: Tensor
    v: Tensor


def spectrum_rows(
    pretrain: dict[str, Tensor],
    full: dict[str, Tensor],
    adapted: set[str],
    notes: list[str],
) -> tuple[list[dict], dict[str, FullUpdate]]:
    """One `spectrum` row per weight present in both checkpoints.

    Returns:
        The rows, and layer -> its full-finetune update with SVD.
    """
    before, after = weight_layers(pretrain), weight_layers(full)
    rows, updates = [], {}
    for layer in natural_sorted([name for name in before if name in after]):
        weight, tuned = pretrain[before[layer]], full[after[layer]]
        if weight.shape != tuned.shape:
            notes.append(f"{layer}: shape {_shape(weight)} vs {_shape(tuned)}; skipped")
            continue
        delta = tuned.double() - weight.double()
        u, s, vh = torch.linalg.svd(as_matrix(delta), full_matrices=False)
        fro, weight_fro = float(s.square().sum().sqrt()), float(torch.linalg.norm(weight.double()))
        sigma1 = float(s[0])
        sigma2 = float(s[1]) if len(s) > 1 else math.nan
        rows.append({
            "kind": SPECTRUM, "layer": layer, "shape": _shape(weight),
            "adapted": layer in adapted, "full_rank": len(s), "fro_norm": fro,
            "weight_fro_norm": weight_fro, "relative_update": _ratio(fro, weight_fro),
            "sigma1": sigma1, "sigma2": sigma2, "sigma1_over_sigma2": _ratio(sigma1, sigma2),
            "effective_rank": effective_rank(s),
            "rank90": energy_rank(s, 0.9), "rank99": energy_rank(s, 0.99),
        })  # fmt: skip
        updates[layer] = FullUpdate(delta, weight.double(), u, s, vh.T)
    skipped = sorted(set(before) ^ set(after))
    if skipped:
        notes.append(f"in only one checkpoint, no spectrum: {', '.join(skipped)}")
    return rows, updates


def lora_vs_full_rows(
    updates: dict[str, FullUpdate], adapters: list[AdapterRun], notes: list[str]
) -> list[dict]:
    """One `lora_vs_full` row per (adapter, adapted layer) with a full-finetune ΔW."""
    rows, unmatched = [], set()
    for adapter in adapters:
        for layer, update in adapter.layers.items():
            if layer not in updates:
                unmatched.add(layer)
                continue
            full, lora = updates[layer], update.delta
            if lora.shape != full.delta.shape:
                notes.append(f"{adapter.name}/{layer}: ΔW {_shape(lora)} != {_shape(full.delta)}")
                continue
            full_norm, lora_norm = float(full.s.square().sum().sqrt()), float(lora.norm())
            k = min(update.rank, len(full.s))
            shares = {top: math.nan for top in (1, k)}
            if full_norm > 0:  # a zero ΔW_full has no singular directions to project onto
                shares = {
                    top: share_in_subspace(lora, full.u[:, :top], full.v[:, :top]) for top in shares
                }
            rows.append({
                "kind": LORA_VS_FULL, "layer": layer, "shape": _shape(full.delta),
                "adapter": adapter.name, "rank": adapter.rank, "seed": adapter.seed,
                "alpha": adapter.alpha, "scaling": update.scaling, "k_top_r": k,
                "proj_top1": shares[1], "proj_top_r": shares[k],
                "relative_error": relative_error(lora, full.delta),
                "norm_ratio": _ratio(lora_norm, full_norm),
                "amplification": amplification(update, full.weight, k, lora_norm),
                "test_acc": None if adapter.run.test_acc is None else round_metric(adapter.run.test_acc),
            })  # fmt: skip
    if unmatched:
        notes.append(
            "adapted layers without a full-finetune ΔW, no lora_vs_full rows: "
            + ", ".join(natural_sorted(list(unmatched)))
        )
    return rows


def amplification(update: LayerUpdate, weight: Tensor, k: int, lora_norm: float) -> float:
    """§7.3 amplification ‖ΔW‖ / ‖U_kᵀ W V_k‖ of a LoRA update, U_k, V_k from its own SVD."""
    if lora_norm == 0:
        return math.nan  # a zero update has no directions to amplify
    u, _, v = update.svd
    return amplification_from_svd(weight, u[:, :k], v[:, :k], lora_norm)


def subspace_rows(adapters: list[AdapterRun]) -> list[dict]:
    """One `subspace` row per layer and unordered pair of adapters that both adapt it and were
    trained at one learning rate with one method (subspaces are never compared across them).

    φ is summarised on the square grid i, j <= m with m = min(r_a, r_b, in): `phi_top1` is
    φ(1, 1), `phi_full` is φ(m, m) (overlap of the whole smaller subspace), `phi_mean` the
    grid mean.
    """
    rows = []
    layers = natural_sorted(list({layer for adapter in adapters for layer in adapter.layers}))
    for layer in layers:
        holders = [adapter for adapter in adapters if layer in adapter.layers]
        for first, second in combinations(holders, 2):
            if not comparable(first, second):
                continue
            v1, v2 = first.layers[layer].input_basis, second.layers[layer].input_basis
            if v1.shape[1] != v2.shape[1]:
                continue
            size = min(v1.shape[0], v2.shape[0])  # = min(r_a, r_b, in)
            grid = similarity_grid_from_bases(v1, v2, size, size)
            rows.append({
                "kind": SUBSPACE, "layer": layer,
                "adapter_a": first.name, "rank_a": first.rank, "seed_a": first.seed,
                "adapter_b": second.name, "rank_b": second.rank, "seed_b": second.seed,
                "grid_size": size, "phi_top1": float(grid[0, 0]),
                "phi_mean": float(grid.mean()), "phi_full": float(grid[-1, -1]),
            })  # fmt: skip
    return rows


def comparable(first: AdapterRun, second: AdapterRun) -> bool:
    """Whether two adapters' subspaces may be compared: same learning rate and method."""
    return (first.run.learning_rate, first.run.method) == (
        second.run.learning_rate,
        second.run.method,
    )


def build_table(rows: list[dict]) -> pd.DataFrame:
    """The long table: fixed column order, nullable ints and booleans."""
    table = pd.DataFrame(rows, columns=COLUMNS)
    for column in _INT_COLUMNS:
        table[column] = pd.array(table[column], dtype="Int64")
    table["adapted"] = pd.array(table["adapted"], dtype="boolean")
    return table
