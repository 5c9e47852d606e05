"""A fake methods study (plain LoRA, DoRA, rsLoRA, PiSSA, LoRA+ over ranks and a learning-rate
grid) with known truths, for the claims and plot tests."""

from __future__ import annotations

import numpy as np
import pandas as pd

from tests.report.fakes import run_row

RANKS = (1, 4, 16, 64)
SEEDS = (0, 1, 2)
NOISE = (-0.002, 0.0, 0.002)  # per seed: a small, known spread


def _accuracy(method: str, rank: int) -> float:
    """Known truths: DoRA +3 points at low ranks only, rsLoRA equal to LoRA, PiSSA and LoRA+
    equal at the end (their speed is in the curves)."""
    base = 0.80 + 0.01 * np.log2(rank)
    return base + (0.03 if method == "dora" and rank <= 4 else 0.0)


def methods_results(lr_grid: tuple[float, ...] = (1e-3, 1e-2)) -> pd.DataFrame:
    """A methods study: every method at every rank, 3 seeds, a learning-rate grid where the
    larger value wins on validation by 2 points (test accuracy is given at both)."""
    rows = [run_row("pretrain", 0, 0.4)]
    for seed, noise in zip(SEEDS, NOISE, strict=True):
        for lr in lr_grid:
            rows.append(run_row("full_finetune", seed, 0.9, learning_rate=lr, val_acc=0.9,
                                run_id=f"full_lr{lr:g}_s{seed}"))  # fmt: skip
        for method in ("default", "dora", "rslora", "pissa", "loraplus"):
            for rank in RANKS:
                for lr in lr_grid:
                    worse = 0.0 if lr == max(lr_grid) else 0.02
                    acc = round(_accuracy(method, rank) + noise - worse, 6)
                    rows.append(run_row(
                        "lora", seed, acc, rank=rank, method=method, learning_rate=lr,
                        val_acc=acc, run_id=f"{method}_r{rank}_lr{lr:g}_s{seed}",
                    ))  # fmt: skip
    df = pd.DataFrame(rows)
    df["run_dir"] = "runs/" + df["run_id"]
    return df


def method_curves(df: pd.DataFrame) -> pd.DataFrame:
    """Five validation points per run: PiSSA starts 10 points higher, the others alike; LoRA+
    gets a spread so wide that nothing can be told."""
    rows = []
    for _, run in df[df["stage"] == "lora"].iterrows():
        spread = (0.2, -0.2, 0.05)[int(run["seed"])]
        lift = {"pissa": 0.1, "loraplus": spread}.get(run["method"], 0.0)
        for epoch in range(5):
            early = (4 - epoch) / 4 * lift
            value = run["test_acc"] * (0.6 + 0.1 * epoch) + early
            rows.append({"run_id": run["run_id"], "epoch": epoch, "val_acc": value})
    return pd.DataFrame(rows)
