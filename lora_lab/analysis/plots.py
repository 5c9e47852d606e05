"""Figures of the analysis: the ΔW_full spectrum and φ heatmaps (LoRA paper Figs. 3 and 4).

Drawn in the project's style and written by its atomic PNG writer (`lora_lab.plotting`), the
same as the report's figures. Which runs a figure pairs is decided on their recorded identity
(rank, alpha, learning rate, method, seed), never on adapter folder names.
"""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import seaborn as sns
import torch
from matplotlib.axes import Axes
from torch import Tensor

from lora_lab.analysis.adapters import AdapterRun
from lora_lab.analysis.measurements import comparable, natural_sorted
from lora_lab.analysis.spectra import similarity_grid_from_bases, subspace_similarity_grid
from lora_lab.plotting import LORA_PALETTE, new_figure, save_figure, theme

SPECTRUM_PNG = "analysis_spectrum.png"
PAPER_RANKS = (8, 64)  # Fig. 3 compares r = 8 with r = 64
MAX_PLOTTED_VALUES = 32
MAX_LAYERS_IN_FULL = 4
_HEAD_NAMES = ("head", "classifier", "lm_head", "output", "out", "fc_out")
# What two runs of one setting share; a seed pair differs in the seed only.
_SETTING = ("alpha", "learning_rate", "method")


def layer_slug(layer: str) -> str:
    """`hidden.0` -> `hidden_0`: a layer name that is safe inside a file name."""
    return re.sub(r"[^A-Za-z0-9_-]+", "_", layer).strip("_") or "layer"


def plot_spectrum(spectra: dict[str, Tensor], path: Path) -> Path:
    """Singular values of ΔW_full per layer, normalised to σ1, log y.

    Args:
        spectra: layer -> singular values `[full_rank]`, largest first.
        path: the PNG to write.
    """
    with theme():
        figure, axes = new_figure(8, 5)
        ax = axes[0, 0]
        for layer, s in spectra.items():
            if len(s) == 0 or s[0] <= 0:
                continue
            shown = (s[:MAX_PLOTTED_VALUES] / s[0]).numpy()
            shown[shown <= 0] = float("nan")  # log scale: exact zeros are simply not drawn
            ax.plot(range(1, len(shown) + 1), shown, marker="o", markersize=3, label=layer)
        ax.set_yscale("log")
        longest = max((len(s) for s in spectra.values()), default=0)
        clipped = (
            f" (first {MAX_PLOTTED_VALUES} of up to {longest})"
            if longest > MAX_PLOTTED_VALUES
            else ""
        )
        ax.set_xlabel(f"index k of the singular value{clipped}")
        ax.set_ylabel("σ_k / σ_1")
        ax.set_title("Spectrum of the full-finetune update ΔW = W_full − W_pretrain")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(title="layer", fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1))
        return save_figure(figure, path)


def _heatmap(ax: Axes, grid: Tensor, title: str, annotate: bool = False) -> None:
    """One φ heatmap: rows i, columns j (1-based), colour fixed to 0..1."""
    rows, columns = grid.shape
    frame = pd.DataFrame(grid.numpy(), index=range(1, rows + 1), columns=range(1, columns + 1))
    sns.heatmap(
        frame, ax=ax, vmin=0.0, vmax=1.0, cmap=LORA_PALETTE, annot=annotate, fmt=".2f",
        annot_kws={"fontsize": 7}, cbar_kws={"label": "φ"},
        xticklabels=max(1, columns // 8), yticklabels=max(1, rows // 8),
    )  # fmt: skip
    ax.set_xlabel("j")
    ax.set_ylabel("i")
    ax.set_title(title, fontsize=10)
    ax.tick_params(axis="y", rotation=0)


def _setting(adapter: AdapterRun) -> str:
    """`α=16, lr=0.001` (plus the method unless it is plain LoRA): what a run was trained with."""
    run = adapter.run
    parts = [f"α={run.alpha:g}" if run.alpha is not None else ""]
    parts.append(f"lr={run.learning_rate:g}" if run.learning_rate is not None else "")
    parts.append(run.method if run.method not in (None, "", "default") else "")
    return ", ".join(part for part in parts if part)


def _label(adapter: AdapterRun) -> str:
    seed = "" if adapter.seed is None else f", seed {adapter.seed}"
    return f"r={adapter.rank}{seed}"


def plot_rank_pair(small: AdapterRun, large: AdapterRun, layer: str, path: Path) -> Path:
    """Fig. 3: φ(A_small, A_large, i, j) over the full grid and zoomed to j <= r_small."""
    grid = similarity_grid_from_bases(
        small.layers[layer].input_basis, large.layers[layer].input_basis
    )  # [r_small, r_large]
    zoom = grid[:, : grid.shape[0]]
    with theme():
        figure, axes = new_figure(13, 4.2, 1, 2, width_ratios=[2.6, 1])
        left, right = axes[0]
        _heatmap(left, grid, f"φ(A[{_label(small)}], A[{_label(large)}], i, j)")
        _heatmap(right, zoom, f"zoom: j ≤ {zoom.shape[1]}", annotate=zoom.numel() <= 64)
        figure.suptitle(f"Subspace similarity between ranks, layer {layer}")
        return save_figure(figure, path)


def plot_seed_pair(first: AdapterRun, second: AdapterRun, layer: str, path: Path) -> Path:
    """Fig. 4: φ between two seeds of one setting, beside two random Gaussian matrices."""
    a1, a2 = first.layers[layer].a, second.layers[layer].a
    grid = similarity_grid_from_bases(
        first.layers[layer].input_basis, second.layers[layer].input_basis
    )
    # The paper's reference: what φ looks like for unrelated directions of the same shape.
    generator = torch.Generator().manual_seed(0)
    random_1 = torch.randn(a1.shape, generator=generator, dtype=torch.float64)
    random_2 = torch.randn(a2.shape, generator=generator, dtype=torch.float64)
    baseline = subspace_similarity_grid(random_1, random_2)
    annotate = grid.numel() <= 64
    with theme():
        figure, axes = new_figure(12, 5, 1, 2)
        left, right = axes[0]
        _heatmap(left, grid, f"φ(A[{_label(first)}], A[{_label(second)}], i, j)", annotate)
        _heatmap(right, baseline, "two random Gaussian A of the same shape", annotate)
        setting = _setting(first)
        figure.suptitle(
            f"Subspace similarity between seeds, layer {layer}"
            + (f" ({setting})" if setting else "")
        )
        return save_figure(figure, path)


def choose_layers(layers: list[str]) -> list[str]:
    """Every adapted layer if there are few; else the first layer and the head.

    The head is a layer named like one (`head`, `classifier`, ...), else the last in
    natural order; the first layer is the first other layer in natural order.
    """
    ordered = natural_sorted(layers)
    if len(ordered) <= MAX_LAYERS_IN_FULL:
        return ordered
    named_head = [layer for layer in ordered if layer.split(".")[-1] in _HEAD_NAMES]
    head = named_head[-1] if named_head else ordered[-1]
    first = next(layer for layer in ordered if layer != head)
    return [first, head]


def _shared(first: AdapterRun, second: AdapterRun) -> tuple[bool, ...]:
    """Which of seed, then alpha, learning rate and method two runs share (for `max`)."""
    return tuple(
        getattr(first.run, name) == getattr(second.run, name) for name in ("seed", *_SETTING)
    )


def pick_rank_pair(holders: list[AdapterRun]) -> tuple[AdapterRun, AdapterRun] | None:
    """Two ranks trained at one learning rate with one method (`comparable`): the paper's
    (8, 64) when such a pair exists, else the pair of the widest rank ratio.

    Of those, the pair that shares the most: the seed first, then alpha, learning rate, method.
    None when no two ranks share a learning rate and method.
    """
    pairs = [
        (small, large)
        for small in holders
        for large in holders
        if small.rank < large.rank and comparable(small, large)
    ]
    if not pairs:
        return None
    paper = [pair for pair in pairs if (pair[0].rank, pair[1].rank) == PAPER_RANKS]
    return max(  # the first of the best pairs
        paper or pairs,
        key=lambda pair: (pair[1].rank / pair[0].rank, *_shared(*pair)),
    )


def pick_seed_pair(holders: list[AdapterRun]) -> tuple[AdapterRun, AdapterRun] | None:
    """Two seeds of one setting (rank, alpha, learning rate, method): at r = 64 when it has
    two, else at the largest rank that does; the first such setting, the two lowest seeds."""
    groups: dict[tuple, dict[int, AdapterRun]] = {}
    for adapter in holders:
        if adapter.seed is not None:
            key = (adapter.rank, *(getattr(adapter.run, name) for name in _SETTING))
            groups.setdefault(key, {}).setdefault(adapter.seed, adapter)
    seeded = {key: runs for key, runs in groups.items() if len(runs) >= 2}
    ranks = {key[0] for key in seeded}
    if not ranks:
        return None
    rank = PAPER_RANKS[1] if PAPER_RANKS[1] in ranks else max(ranks)
    runs = next(runs for key, runs in seeded.items() if key[0] == rank)
    first, second = (runs[seed] for seed in sorted(runs)[:2])
    return first, second


def draw_subspace_figures(
    study_dir: Path, adapters: list[AdapterRun], notes: list[str]
) -> list[Path]:
    """`analysis_subspace_<layer>.png` and `analysis_seeds_<layer>.png` for chosen layers."""
    layers = sorted({layer for adapter in adapters for layer in adapter.layers})
    written = []
    for layer in choose_layers(layers):
        holders = [adapter for adapter in adapters if layer in adapter.layers]
        slug = layer_slug(layer)
        try:
            if (pair := pick_rank_pair(holders)) is not None:
                path = study_dir / f"analysis_subspace_{slug}.png"
                written.append(plot_rank_pair(*pair, layer, path))
            else:
                notes.append(
                    f"{layer}: no two ranks share a learning rate and method, no rank-vs-rank "
                    "heatmap (subspaces are not compared across learning rates)"
                )
            if (pair := pick_seed_pair(holders)) is not None:
                path = study_dir / f"analysis_seeds_{slug}.png"
                written.append(plot_seed_pair(*pair, layer, path))
            else:
                notes.append(f"{layer}: no setting with two seeds, no seed-vs-seed heatmap")
        except ValueError as error:  # e.g. two adapters of one layer with different inputs
            notes.append(f"{layer}: heatmap skipped ({error})")
    return written
