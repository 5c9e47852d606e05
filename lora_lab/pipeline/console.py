"""What a study says while it runs: progress lines that reach the terminal and the study's
log file, and one line per epoch in place of Lightning's per-batch bar when the output is not a
terminal (a log file, a pipe, a batch job)."""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback
from omegaconf import DictConfig

log = logging.getLogger("lora_lab.progress")
# The study's log file (conf/hydra/job_logging/lora_lab.yaml names it for Hydra's handler).
LOG_FILE = "lora-lab.log"
# Metrics that are bookkeeping, not news (stages.FinishedEpochs counts epochs for resuming).
HIDDEN = {"finished_epochs"}


def say(message: str, level: int = logging.INFO) -> None:
    """Report progress: through logging where it is set up (under `lora-lab`, Hydra's handlers
    write the terminal and `<output_dir>/lora-lab.log`), else on stderr."""
    if logging.getLogger().handlers:
        log.log(level, message)
    else:
        print(message, file=sys.stderr, flush=True)


class ConsoleFormatter(logging.Formatter):
    """The terminal's log format: the message alone, with `warning:`/`error:` before the
    messages that are one (the log file keeps time, logger and level)."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if record.levelno >= logging.WARNING:
            return f"{record.levelname.lower()}: {text}"
        return text


def log_like_the_cli(log_file: Path) -> None:
    """In a worker process (the `sweep.jobs` pool): log as the `lora-lab` process does, to
    stderr and appended to the study's log file."""
    root = logging.getLogger()
    if root.handlers:
        return
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(ConsoleFormatter("%(message)s"))
    root.addHandler(console)
    root.setLevel(logging.INFO)
    try:
        to_file = logging.FileHandler(log_file)
    except OSError:  # no study folder (a bare pool): the terminal only
        return
    to_file.setFormatter(logging.Formatter(FILE_FORMAT))
    root.addHandler(to_file)


FILE_FORMAT = "[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"


class EpochLine(Callback):
    """One line per finished epoch, in place of the per-batch progress bar.

    Args:
        label: What is training (a run id, or a fused pass and its size).
    """

    def __init__(self, label: str) -> None:
        self.label = label
        self.pending: int | None = None  # the finished epoch whose line is still to say

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # The epoch's aggregated training metrics are filled in after this hook: say the line
        # when the next epoch starts, or when training ends.
        self.pending = trainer.current_epoch + 1

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._say(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._say(trainer)

    def _say(self, trainer: L.Trainer) -> None:
        if self.pending is None or not trainer.is_global_zero:
            return
        metrics = {
            key: float(value)
            for key, value in trainer.callback_metrics.items()
            if "/" not in key and key not in HIDDEN and getattr(value, "numel", lambda: 1)() == 1
        }
        shown = " ".join(f"{key}={value:.4g}" for key, value in sorted(metrics.items()))
        say(f"    {self.label}: epoch {self.pending}/{trainer.max_epochs} {shown}".rstrip())
        self.pending = None


def process_started() -> float | None:
    """When this process started, as a `time.time()` value, from Linux's /proc (None where
    there is no /proc)."""
    try:
        # Field 22 of /proc/self/stat: the start time in clock ticks after boot; the fields
        # after the command's name (in parentheses, which may hold spaces) begin at field 3.
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return time.time() - (uptime - ticks / os.sysconf("SC_CLK_TCK"))


class FirstStep(Callback):
    """Says when the process's first training step starts, counted from the process's start:
    the start-up a user waits through (imports, preflight, building the first run).

    Args:
        started: When the process started (`process_started`).
    """

    def __init__(self, started: float) -> None:
        self.started = started
        self.done = False

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.done or not trainer.is_global_zero:
            return
        self.done = True
        seconds = time.time() - self.started
        say(f"    start-up: first training step {seconds:.1f} s after the process started")


_first_step: list[FirstStep] = []  # the process's one FirstStep, once a Trainer has it


def progress_options(trainer_cfg: DictConfig, label: str) -> tuple[dict[str, Any], list[Callback]]:
    """Trainer keyword arguments and callbacks for showing progress.

    Lightning's bar where stderr is a terminal and the config enables it; otherwise the bar is
    off and, if the config wanted one, an `EpochLine` says each epoch once. The process's
    first Trainer also gets a `FirstStep`.
    """
    callbacks: list[Callback] = []
    started = process_started()
    if not _first_step and started is not None:
        _first_step.append(FirstStep(started))
        callbacks.append(_first_step[0])
    wanted = bool(trainer_cfg.get("enable_progress_bar", True))
    if not wanted or sys.stderr.isatty():
        return {}, callbacks
    return {"enable_progress_bar": False}, [*callbacks, EpochLine(label)]
