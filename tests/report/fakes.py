"""Fake study folders for the report tests: results tables built here, no training involved."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib.image
import numpy as np
import pandas as pd

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def assert_png(path: Path | None, min_width: int = 300, min_height: int = 200) -> None:
    """``path`` is a real PNG that matplotlib reads back with a plausible size."""
    assert path is not None, "plot was skipped"
    path = Path(path)
    assert path.read_bytes()[:8] == PNG_MAGIC, f"{path} is not a PNG"
    image = matplotlib.image.imread(path)
    height, width = image.shape[:2]
    assert width >= min_width and height >= min_height, (width, height)
    assert image.std() > 0.01, "image is blank"


CLASSES = ["T-shirt", "Trouser", "Pullover", "Dress", "Coat"]
ALPHA = 8.0
LEARNING_RATE = 1e-3


def run_row(stage: str, seed: int, test_acc: float | None, **overrides: object) -> dict:
    """One results row following the pipeline contract (column order included)."""
    rank = overrides.pop("rank", None)
    is_lora = stage == "lora"
    trainable = {"pretrain": 100_000, "full_finetune": 100_000}.get(stage, 150 * (rank or 0))
    row = {
        "run_id": f"{stage}_s{seed}" if not is_lora else f"lora_r{rank}_s{seed}",
        "stage": stage,
        "rank": rank if is_lora else None,
        "alpha": ALPHA if is_lora else None,
        "seed": seed,
        "learning_rate": LEARNING_RATE,
        "trainable_params": trainable,
        "total_params": 100_000 + (trainable if is_lora else 0),
        "test_acc": test_acc,
        "test_loss": None if test_acc is None else round(2.5 * (1 - test_acc), 6),
        "per_class_acc": "{}",
        "source_test_acc": 0.93 if stage == "pretrain" else None,
        "train_seconds": 10.0 + seed,
        "epochs": 3,
        "run_dir": "",
        "status": "ok",
        "error": "",
    }
    row["run_dir"] = f"runs/{row['run_id']}"
    row.update(overrides)
    return row


def per_class_json(mean: float, seed: int) -> str:
    """Per-class accuracies scattered around ``mean`` (deterministic)."""
    offsets = np.linspace(-0.15, 0.1, len(CLASSES))
    values = np.clip(mean + offsets + 0.01 * seed, 0.0, 1.0)
    return json.dumps({name: round(float(v), 4) for name, v in zip(CLASSES, values, strict=True)})


def make_results(
    ranks: tuple[int, ...] = (1, 2, 4, 8, 16),
    seeds: tuple[int, ...] = (0, 1, 2),
    per_class: bool = True,
) -> pd.DataFrame:
    """A complete classification study: pretrain, full finetune and a LoRA rank sweep."""
    rows = [run_row("pretrain", 0, 0.41)]
    for seed in seeds:
        rows.append(run_row("full_finetune", seed, 0.90 + 0.01 * seed))
        for rank in ranks:
            acc = round(0.70 + 0.04 * np.log2(rank) + 0.005 * seed, 4)
            rows.append(run_row("lora", seed, acc, rank=rank))
    df = pd.DataFrame(rows)
    if per_class:
        df["per_class_acc"] = [
            per_class_json(a, s) for a, s in zip(df["test_acc"], df["seed"], strict=True)
        ]
    return df


def write_metrics(
    run_path: Path,
    final_acc: float = 0.8,
    epochs: int = 4,
    steps_per_epoch: int = 3,
    acc: bool = True,
) -> None:
    """A sparse Lightning CSVLogger file: train rows and val rows never share a line.

    Curves approach ``final_acc`` so that different runs draw visibly different lines.
    """
    records = []
    step = 0
    for epoch in range(epochs):
        for _ in range(steps_per_epoch):
            step += 1
        progress = 1 - 0.6 ** (epoch + 1)
        accuracy = 0.1 + (final_acc - 0.1) * progress
        loss = 2.5 * (1 - accuracy)
        train = {"epoch": epoch, "step": step, "train_loss": loss * 0.9}
        val = {"epoch": epoch, "step": step, "val_loss": loss}
        if acc:
            train["train_acc"] = min(1.0, accuracy + 0.02)
            val["val_acc"] = accuracy
        records += [val, train]
    columns = ["epoch", "step", "train_loss", "val_loss"] + (
        ["train_acc", "val_acc"] if acc else []
    )
    (run_path / "logs").mkdir(parents=True, exist_ok=True)
    pd.DataFrame(records, columns=columns).to_csv(run_path / "logs" / "metrics.csv", index=False)


def write_study(study: Path, df: pd.DataFrame, metrics: bool = True, acc: bool = True) -> Path:
    """Write ``results.csv`` (and a metrics.csv per finished run) into ``study``."""
    study.mkdir(parents=True, exist_ok=True)
    df.to_csv(study / "results.csv", index=False)
    if metrics:
        for _, row in df[df["status"] == "ok"].iterrows():
            # Regression rows have no accuracy: derive the curve's end point from the loss.
            final = (
                row["test_acc"] if pd.notna(row["test_acc"]) else max(0.2, 1 - row["test_loss"] / 4)
            )
            write_metrics(study / row["run_dir"], final_acc=final, acc=acc)
    return study


def make_regression_results(
    ranks: tuple[int, ...] = (1, 2, 4), seeds: tuple[int, ...] = (0, 1)
) -> pd.DataFrame:
    """A linear-shift style study: no accuracy at all, test loss only, an extra numeric column."""
    rows = [run_row("pretrain", 0, None, test_loss=4.0, source_test_acc=None)]
    for seed in seeds:
        rows.append(run_row("full_finetune", seed, None, test_loss=0.01 * (seed + 1)))
        for rank in ranks:
            rows.append(
                run_row("lora", seed, None, rank=rank, test_loss=1.0 / rank**2 + 0.01 * seed)
            )
    df = pd.DataFrame(rows)
    df["delta_rel_error"] = [0.5 / (r if r == r else 1) for r in df["rank"].astype(float)]
    return df


def vary_lora(df: pd.DataFrame, column: str, values: tuple[float, ...]) -> pd.DataFrame:
    """Repeat every LoRA row once per value of ``column`` (e.g. two alphas); run ids stay unique."""
    lora = df[df["stage"] == "lora"]
    copies = []
    for value in values:
        copy = lora.copy()
        copy[column] = value
        copy["run_id"] = copy["run_id"] + f"_{column}{value:g}"
        copy["run_dir"] = "runs/" + copy["run_id"]
        copies.append(copy)
    return pd.concat([df[df["stage"] != "lora"], *copies], ignore_index=True)
