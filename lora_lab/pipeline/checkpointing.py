"""Checkpoints and logs across an interruption: Lightning's `last.ckpt` each epoch, where a run
resumes, and the CSV log rows of the epochs before it."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import pandas as pd
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from lora_lab._atomic import atomic_write_text
from lora_lab.pipeline.console import say
from lora_lab.pipeline.resume import IDENTITY_FILE, resume_checkpoint

log = logging.getLogger(__name__)


def log_before(run_dir: Path, epochs: int) -> pd.DataFrame | None:
    """The CSV log rows of the first `epochs` epochs (CSVLogger rewrites its file on resume)."""
    path = run_dir / "logs" / "metrics.csv"
    if epochs <= 0 or not path.is_file():
        return None
    rows = pd.read_csv(path)
    return rows[rows["epoch"] < epochs] if "epoch" in rows else None


def prepend_log(run_dir: Path, earlier: pd.DataFrame) -> None:
    """Put the epochs logged before an interruption back in front of the resumed run's log."""
    path = run_dir / "logs" / "metrics.csv"
    later = pd.read_csv(path) if path.is_file() else earlier.iloc[0:0]
    rows = pd.concat([earlier, later], ignore_index=True)
    atomic_write_text(path, rows.to_csv(index=False), fsync=True)


def _checkpoint_epoch(path: Path) -> int | None:
    """The number of finished epochs a Lightning checkpoint holds, or None if unreadable."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
        return int(checkpoint["epoch"]) + 1
    except Exception:  # a truncated or foreign file: the caller restarts the run
        return None


def resume_point(run_dir: Path, identity: str, name: str) -> tuple[Path | None, int]:
    """Where an interrupted run (or fused pass) with this identity resumes: its `last.ckpt`
    and the number of epochs it holds, or `(None, 0)` to start afresh. Writes the identity
    marker that the next attempt checks; an unreadable checkpoint is removed, with a warning.
    """
    resume_from = resume_checkpoint(run_dir, identity)
    atomic_write_text(run_dir / IDENTITY_FILE, identity + "\n")
    if resume_from is None:
        return None, 0
    epoch = _checkpoint_epoch(resume_from)
    if epoch is None:
        log.warning("%s: %s is unreadable; starting the run again", name, resume_from)
        resume_from.unlink()
        return None, 0
    say(f"    resuming {name} after epoch {epoch} from {resume_from}")
    return resume_from, epoch


def epoch_checkpoint(folder: Path) -> ModelCheckpoint:
    """Lightning's own checkpointing: `last.ckpt` at every epoch end, nothing else kept."""
    return ModelCheckpoint(
        dirpath=folder,
        filename="last",
        monitor=None,
        save_top_k=1,  # with no monitor: the newest epoch, replacing the previous file
        every_n_epochs=1,
        save_on_train_epoch_end=True,
        enable_version_counter=False,
    )


class FinishedEpochs(Callback):
    """Puts the number of finished epochs into `trainer.callback_metrics` at the end of fit.

    A spawn-based strategy (`trainer=ddp`) trains in child processes and copies back only the
    weights and `callback_metrics`; the parent's own `trainer.current_epoch` stays 0.
    """

    KEY = "finished_epochs"

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # On the module's device, as Lightning keeps every callback metric of a run.
        epochs = torch.tensor(float(trainer.current_epoch), device=pl_module.device)
        trainer.callback_metrics[self.KEY] = epochs
