"""Figures of the analysis: the ΔW_full spectrum and φ heatmaps (LoRA paper Figs. 3 and 4).

Figures are built on `matplotlib.figure.Figure` directly (rendered by Agg on save) instead of
pyplot, so drawing touches no global backend or figure state of the calling process.
"""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import seaborn as sns
import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from torch import Tensor

from lora_lab._atomic import atomic_path
from lora_lab.analysis.readers import Adapter, natural_sorted
from lora_lab.analysis.spectra import similarity_grid_from_bases, subspace_similarity_grid

SPECTRUM_PNG = "analysis_spectrum.png"
PAPER_RANKS = (8, 64)  # Fig. 3 compares r = 8 with r = 64
MAX_PLOTTED_VALUES = 32
MAX_LAYERS_IN_FULL = 4
_HEAD_NAMES = ("head", "classifier", "lm_head", "output", "out", "fc_out")


def layer_slug(layer: str) -> str:
    """`hidden.0` -> `hidden_0`: a layer name that is safe inside a file name."""
    return re.sub(r"[^A-Za-z0-9_-]+", "_", layer).strip("_") or "layer"


def save_figure(figure: Figure, path: Path) -> Path:
    """Writes a PNG atomically, so a reader never sees half a file."""
    with atomic_path(path) as temporary:
        figure.savefig(temporary, format="png", dpi=110, bbox_inches="tight")
    return path


def plot_spectrum(spectra: dict[str, Tensor], path: Path) -> Path:
    """Singular values of ΔW_full per layer, normalised to σ1, log y.

    Args:
        spectra: layer -> singular values `[full_rank]`, largest first.
        path: the PNG to write.
    """
    figure = Figure(figsize=(8, 5))
    axes = figure.add_subplot()
    for layer, s in spectra.items():
        if len(s) == 0 or s[0] <= 0:
            continue
        shown = (s[:MAX_PLOTTED_VALUES] / s[0]).numpy()
        shown[shown <= 0] = float("nan")  # log scale: exact zeros are simply not drawn
        axes.plot(range(1, len(shown) + 1), shown, marker="o", markersize=3, label=layer)
    axes.set_yscale("log")
    longest = max((len(s) for s in spectra.values()), default=0)
    clipped = (
        f" (first {MAX_PLOTTED_VALUES} of up to {longest})" if longest > MAX_PLOTTED_VALUES else ""
    )
    axes.set_xlabel(f"index k of the singular value{clipped}")
    axes.set_ylabel("σ_k / σ_1")
    axes.set_title("Spectrum of the full-finetune update ΔW = W_full − W_pretrain")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(title="layer", fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1))
    return save_figure(figure, path)


def _heatmap(axes: Axes, grid: Tensor, title: str, annotate: bool = False) -> None:
    """One φ heatmap: rows i, columns j (1-based), colour fixed to 0..1."""
    rows, columns = grid.shape
    frame = pd.DataFrame(grid.numpy(), index=range(1, rows + 1), columns=range(1, columns + 1))
    sns.heatmap(
        frame, ax=axes, vmin=0.0, vmax=1.0, cmap="viridis", annot=annotate, fmt=".2f",
        annot_kws={"fontsize": 7}, cbar_kws={"label": "φ"},
        xticklabels=max(1, columns // 8), yticklabels=max(1, rows // 8),
    )  # fmt: skip
    axes.set_xlabel("j")
    axes.set_ylabel("i")
    axes.set_title(title, fontsize=10)
    axes.tick_params(axis="y", rotation=0)


def _label(adapter: Adapter) -> str:
    seed = "" if adapter.seed is None else f", seed {adapter.seed}"
    return f"r={adapter.rank}{seed}"


def plot_rank_pair(small: Adapter, large: Adapter, module: str, layer: str, path: Path) -> Path:
    """Fig. 3: φ(A_small, A_large, i, j) over the full grid and zoomed to j <= r_small."""
    grid = similarity_grid_from_bases(
        small.modules[module].input_basis, large.modules[module].input_basis
    )  # [r_small, r_large]
    zoom = grid[:, : grid.shape[0]]
    figure = Figure(figsize=(13, 4.2))
    left, right = figure.subplots(1, 2, width_ratios=[2.6, 1])
    _heatmap(left, grid, f"φ(A[{_label(small)}], A[{_label(large)}], i, j)")
    _heatmap(right, zoom, f"zoom: j ≤ {zoom.shape[1]}", annotate=zoom.numel() <= 64)
    figure.suptitle(f"Subspace similarity between ranks, layer {layer}")
    return save_figure(figure, path)


def plot_seed_pair(first: Adapter, second: Adapter, module: str, layer: str, path: Path) -> Path:
    """Fig. 4: φ between two seeds at one rank, beside two random Gaussian matrices."""
    a1, a2 = first.modules[module].a, second.modules[module].a
    grid = similarity_grid_from_bases(
        first.modules[module].input_basis, second.modules[module].input_basis
    )
    # The paper's reference: what φ looks like for unrelated directions of the same shape.
    generator = torch.Generator().manual_seed(0)
    random_1 = torch.randn(a1.shape, generator=generator, dtype=torch.float64)
    random_2 = torch.randn(a2.shape, generator=generator, dtype=torch.float64)
    baseline = subspace_similarity_grid(random_1, random_2)
    annotate = grid.numel() <= 64
    figure = Figure(figsize=(12, 5))
    left, right = figure.subplots(1, 2)
    _heatmap(left, grid, f"φ(A[{_label(first)}], A[{_label(second)}], i, j)", annotate)
    _heatmap(right, baseline, "two random Gaussian A of the same shape", annotate)
    figure.suptitle(f"Subspace similarity between seeds, layer {layer}")
    return save_figure(figure, path)


def choose_modules(modules: list[str], module_to_layer: dict[str, str]) -> list[str]:
    """Every adapted module if there are few; else the first layer and the head.

    The head is a module named like one (`head`, `classifier`, ...), else the last in
    natural order; the first layer is the first other module in natural order.
    """
    ordered = natural_sorted(modules)
    if len(ordered) <= MAX_LAYERS_IN_FULL:
        return ordered
    named_head = [m for m in ordered if module_to_layer.get(m, m).split(".")[-1] in _HEAD_NAMES]
    head = named_head[-1] if named_head else ordered[-1]
    first = next(m for m in ordered if m != head)
    return [first, head]


def pick_rank_pair(holders: list[Adapter]) -> tuple[Adapter, Adapter] | None:
    """The paper's (8, 64) when present, else the smallest and largest rank; same seed if any."""
    ranks = sorted({adapter.rank for adapter in holders})
    if len(ranks) < 2:
        return None
    low, high = PAPER_RANKS if set(PAPER_RANKS) <= set(ranks) else (ranks[0], ranks[-1])
    lows = [a for a in holders if a.rank == low]
    highs = [a for a in holders if a.rank == high]
    for small in lows:
        for large in highs:
            if small.seed == large.seed:
                return small, large
    return lows[0], highs[0]


def pick_seed_pair(holders: list[Adapter]) -> tuple[Adapter, Adapter] | None:
    """Two seeds at one rank: r = 64 when it has two, else the largest rank that does."""
    by_rank: dict[int, list[Adapter]] = {}
    for adapter in holders:
        if adapter.seed is not None:
            by_rank.setdefault(adapter.rank, []).append(adapter)
    candidates = [rank for rank, group in by_rank.items() if len(group) >= 2]
    if not candidates:
        return None
    rank = PAPER_RANKS[1] if PAPER_RANKS[1] in candidates else max(candidates)
    first, second = by_rank[rank][:2]
    return first, second


def draw_subspace_figures(
    study_dir: Path, adapters: list[Adapter], module_to_layer: dict[str, str], notes: list[str]
) -> list[Path]:
    """`analysis_subspace_<layer>.png` and `analysis_seeds_<layer>.png` for chosen layers."""
    modules = sorted({module for adapter in adapters for module in adapter.modules})
    written = []
    for module in choose_modules(modules, module_to_layer):
        layer = module_to_layer.get(module, module)
        holders = [adapter for adapter in adapters if module in adapter.modules]
        slug = layer_slug(layer)
        try:
            if (pair := pick_rank_pair(holders)) is not None:
                path = study_dir / f"analysis_subspace_{slug}.png"
                written.append(plot_rank_pair(*pair, module, layer, path))
            else:
                notes.append(f"{layer}: one rank only, no rank-vs-rank heatmap")
            if (pair := pick_seed_pair(holders)) is not None:
                path = study_dir / f"analysis_seeds_{slug}.png"
                written.append(plot_seed_pair(*pair, module, layer, path))
            else:
                notes.append(f"{layer}: no rank with two seeds, no seed-vs-seed heatmap")
        except ValueError as error:  # e.g. two adapters of one module with different inputs
            notes.append(f"{layer}: heatmap skipped ({error})")
    return written
