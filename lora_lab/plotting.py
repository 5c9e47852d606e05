"""The project's figure style and PNG writer, shared by the report and the analysis.

The report and the analysis are sibling layers that may not import each other, so what both
draw with lives here, below them: the theme, the role colours, a pyplot-free figure and the
atomic PNG writer. It imports nothing of `lora_lab` but the atomic writer.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import seaborn as sns
from matplotlib.figure import Figure

from lora_lab._atomic import atomic_path

# One colour per role, the same in every figure, so a reader learns them once.
PRETRAIN_COLOR = "0.45"
FULL_FINETUNE_COLOR = "#c0392b"
LORA_COLOR = "#1f6fb4"
LORA_PALETTE = "viridis"


@contextlib.contextmanager
def theme() -> Iterator[None]:
    """Seaborn's whitegrid look, scoped so importing lora_lab never restyles a user's plots."""
    with sns.axes_style("whitegrid"), sns.plotting_context("notebook", font_scale=0.9):
        yield


def new_figure(
    width: float, height: float, nrows: int = 1, ncols: int = 1, **kwargs
) -> tuple[Figure, np.ndarray]:
    """A pyplot-free figure (no global figure registry, nothing to close) and its axes grid.

    Args:
        width: Figure width in inches.
        height: Figure height in inches.
        nrows: Rows of axes.
        ncols: Columns of axes.
        **kwargs: Passed to ``Figure.subplots`` (e.g. ``sharey``, ``width_ratios``).

    Returns:
        ``(figure, axes)`` with ``axes`` always a 2-D array.
    """
    fig = Figure(figsize=(width, height), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False, **kwargs)
    return fig, axes


def sequential_colors(values: Sequence[object]) -> list[tuple[float, float, float]]:
    """One colour per ordered value (ranks, alphas) from a sequential palette: low = dark."""
    return sns.color_palette(LORA_PALETTE, n_colors=max(len(values), 1))


def save_figure(fig: Figure, path: str | Path, dpi: int = 120) -> Path:
    """Save a figure as PNG atomically; `bbox_inches="tight"` keeps outside legends in frame."""
    path = Path(path)
    with atomic_path(path) as temp, open(temp, "wb") as stream:
        fig.savefig(stream, format="png", dpi=dpi, bbox_inches="tight")
    return path
