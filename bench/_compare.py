"""Shared by the fused-vs-sequential benchmarks: running a study and timing its LoRA stage,
and the accuracy comparison they print."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd


def lora_stage_seconds(cmd: list[str], out: Path) -> float:
    """Run one study (exit on failure) and return its LoRA stage's wall time: from the last
    result before the LoRA stage (pretrain, full finetune) to the last LoRA result (file
    times)."""
    done = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if done.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    results = list((out / "runs").glob("*/result.json"))
    lora = [p.stat().st_mtime for p in results if p.parent.name.startswith("lora_")]
    before = [p.stat().st_mtime for p in results if not p.parent.name.startswith("lora_")]
    return max(lora) - max(before)


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
