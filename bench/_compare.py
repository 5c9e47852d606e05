"""Shared by the fused-vs-sequential benchmarks: the accuracy comparison they print."""

from __future__ import annotations

import pandas as pd


def print_mean_gap(means: pd.DataFrame, fused: str, sequential: str, seeds: str) -> None:
    """Print the per-setting mean test accuracies of both paths and the largest gap against
    the 0.5-point target; `fused` and `sequential` name the columns of `means`."""
    means = means.assign(difference=means[fused] - means[sequential])
    gap = means.difference.abs().max()
    print(f"\nLoRA test accuracy, mean over seeds {seeds}:")
    print(means.reset_index().to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    print(
        f"largest |fused - sequential| of the means: {100 * gap:.2f} points  (target ≤ 0.50)  "
        f"{'PASS' if gap <= 0.005 else 'FAIL'}"
    )
