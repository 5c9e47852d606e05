"""One run lifecycle, for every runner: a run alone (`sequential.run_stage`) is a training pass
of one run, a fused pass (`fused.run_fused_group`) one of K members, and both go through here.

- `RunSetup` is one run of a pass: its folder (`runs/<run_id>/`) and config, its loggers, its
  seeded DataModule and LightningModule, and at the end its artefact (adapter or weights) and
  its `RunResult`.
- `TrainingPass` is the Trainer around them: its callbacks, the resume point, the log rows
  kept across an interruption, the fit, and the tester.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import Logger
from omegaconf import DictConfig, open_dict

from lora_lab.lora import save_adapter
from lora_lab.models import TaskModule, save_network_weights
from lora_lab.pipeline.builders import build_module, single_device_trainer
from lora_lab.pipeline.checkpointing import (
    FinishedEpochs,
    epoch_checkpoint,
    log_before,
    prepend_log,
    resume_point,
)
from lora_lab.pipeline.console import progress_options
from lora_lab.pipeline.cpu import ThreadChooser
from lora_lab.pipeline.record import finished_result
from lora_lab.pipeline.run_config import adapter_name_for, run_id_for
from lora_lab.pipeline.threads import ThreadBudget
from lora_lab.results import RunResult


@dataclass
class RunSetup:
    """One run of a training pass: its config, folder, loggers and what it starts from.

    Attributes:
        cfg: The run's own config, with `run_id` and `run_dir` set.
        study_dir: The study folder (the artefact is saved below it).
        adapter: The LoRA adapter's folder under `adapters/` ("" for the other stages).
        identity: The run's identity (`resume.run_identity`), or None.
        pretrained: The weights a finetune starts from.
        loggers: The run's loggers, from `cfg.logger`.
    """

    cfg: DictConfig
    study_dir: Path
    adapter: str
    identity: str | None
    pretrained: Path | None
    loggers: list[Logger]

    @classmethod
    def open(
        cls,
        run_cfg: DictConfig,
        study_dir: Path,
        *,
        run_id: str | None = None,
        adapter: str | None = None,
        identity: str | None = None,
        pretrained: Path | None = None,
    ) -> RunSetup:
        """Make the run's folder `runs/<run_id>/` and its loggers; `run_cfg` is changed in place.

        Args:
            run_cfg: A config from `stage_config`, this run's own copy.
            study_dir: The study folder.
            run_id: The run's folder name; None derives it from stage, rank, alpha and seed.
            adapter: The LoRA adapter's folder; None: `rank_<r>_seed_<s>`.
            identity: The run's identity; None: no resume checkpoint.
            pretrained: The weights a finetune starts from.
        """
        stage, seed = run_cfg.stage, int(run_cfg.seed)
        rank = int(run_cfg.lora.rank) if stage == "lora" else None
        alpha = float(run_cfg.lora.alpha) if stage == "lora" else None
        run_id = run_id or run_id_for(stage, rank, alpha, seed)
        adapter = (adapter or adapter_name_for(int(rank or 0), seed)) if stage == "lora" else ""
        run_dir = study_dir / "runs" / run_id
        run_dir.mkdir(parents=True, exist_ok=True)
        with open_dict(run_cfg):
            run_cfg.run_id, run_cfg.run_dir = run_id, str(run_dir)
        loggers = [instantiate(c) for c in run_cfg.logger.values()] if run_cfg.get("logger") else []
        return cls(run_cfg, study_dir, adapter, identity, pretrained, loggers)

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg.run_dir)

    def build(self) -> tuple[TaskModule, L.LightningDataModule]:
        """The run's module and DataModule, seeded by its seed (data first, then network), so a
        fused member starts exactly where its run alone starts."""
        L.seed_everything(int(self.cfg.seed), workers=True, verbose=False)
        datamodule = instantiate(self.cfg.data)
        return build_module(self.cfg, instantiate(self.cfg.model), self.pretrained), datamodule

    def save(self, module: TaskModule) -> str:
        """Save the run's artefact: a LoRA run's adapter, another stage's network weights.
        Returns its path relative to the study folder."""
        if self.cfg.stage == "lora":
            artefact = f"adapters/{self.adapter}"
            save_adapter(module.network, self.study_dir / artefact)
        else:
            artefact = f"checkpoints/{self.cfg.run_id}.safetensors"
            save_network_weights(module.network, self.study_dir / artefact)
        return artefact

    def finish(
        self,
        module: TaskModule,
        datamodule: Any,
        tested: dict[str, Any],
        fit: Fit,
        *,
        val_acc: float | None,
        pass_id: str = "",
        source_test_acc: float | None = None,
    ) -> RunResult:
        """Save the artefact; the run's result (a pass's training time shared out over its runs,
        so the column still sums to the time spent)."""
        return finished_result(
            self.cfg,
            module,
            datamodule,
            tested,
            source_test_acc=source_test_acc,
            train_seconds=fit.seconds / fit.runs,
            epochs=fit.epochs,
            identity=self.identity,
            pretrained=self.pretrained,
            artefact=self.save(module),
            pass_id=pass_id,
            val_acc=None if val_acc is None else float(val_acc),
        )


@dataclass
class Fit:
    """What a pass's fit gives its runs: the Trainer, the time, finished epochs and run count."""

    trainer: L.Trainer
    seconds: float
    epochs: int
    runs: int


class TrainingPass:
    """The Trainer of one training pass (a run alone, or a fused pass) and what surrounds its fit.

    With an identity the pass saves `last.ckpt` in `folder` at every epoch end (Lightning's
    `ModelCheckpoint`, only the latest kept) and resumes from one an interrupted pass with the
    same identity left. Without one there is no checkpointing but what `trainer.*` asks for
    (`trainer.enable_checkpointing`, false in `conf/trainer/auto.yaml`).

    Args:
        cfg: The config whose `trainer` (and `threads`) the pass uses.
        folder: Where its Trainer writes (`default_root_dir`) and checkpoints.
        name: What it is called in lines said about it (resume) and its progress.
        runs: Its runs; their `metrics.csv` rows before the resume point are kept.
        identity: The pass's identity; None: no resume checkpoint.
        loggers: The Trainer's loggers (a run alone: its own; a fused pass: False, its module
            logs each member's rows to that member's loggers).
        choose_threads: Add the `ThreadChooser` (fused passes: many small ops per step; a
            run alone keeps the thread budget's count, as it always has).
    """

    def __init__(
        self,
        cfg: DictConfig,
        folder: Path,
        name: str,
        runs: list[RunSetup],
        *,
        identity: str | None,
        loggers: list[Logger] | bool,
        choose_threads: bool = False,
    ) -> None:
        self.cfg, self.folder, self.runs = cfg, folder, runs
        self.resume_from, self.epoch = None, 0
        if identity is not None:
            self.resume_from, self.epoch = resume_point(folder, identity, name)
        label = name if len(runs) == 1 else f"{name} ({len(runs)} runs)"
        self.trainer = self._trainer(label, loggers, identity is not None, choose_threads)
        # Before any logger opens its file (a CSV logger's writer deletes an old metrics.csv).
        self.earlier = [log_before(run.run_dir, self.epoch) for run in runs]

    def _trainer(
        self, label: str, loggers: list[Logger] | bool, resumable: bool, choose_threads: bool
    ) -> L.Trainer:
        # Callbacks listed in the trainer config (e.g. trainer=ddp's replica check) come first;
        # the thread budget before the chooser: each epoch's trial starts from it.
        callbacks: list[Callback] = list(instantiate(self.cfg.trainer.get("callbacks")) or [])
        callbacks += [FinishedEpochs(), ThreadBudget(self.cfg)]
        callbacks += [ThreadChooser()] if choose_threads else []
        # Our own checkpoint needs checkpointing on; otherwise trainer.enable_checkpointing
        # decides (forcing it on gave every `lora-lab train` Lightning's default checkpointer).
        checkpointing: dict[str, Any] = {}
        if resumable:
            callbacks.append(epoch_checkpoint(self.folder))
            checkpointing["enable_checkpointing"] = True
        progress, progress_callbacks = progress_options(self.cfg.trainer, label)
        return instantiate(
            self.cfg.trainer,
            logger=loggers,
            callbacks=callbacks + progress_callbacks,
            default_root_dir=str(self.folder),
            **checkpointing,
            **progress,
        )

    def fit(self, module: L.LightningModule, datamodule: L.LightningDataModule) -> Fit:
        """Fit (resumed where the pass has a checkpoint), then put the log rows of the epochs
        before the interruption back in front of each run's log."""
        resume = str(self.resume_from) if self.resume_from else None
        start = time.perf_counter()
        self.trainer.fit(module, datamodule=datamodule, ckpt_path=resume)
        seconds = time.perf_counter() - start
        for run, rows in zip(self.runs, self.earlier, strict=True):
            if rows is not None:
                prepend_log(run.run_dir, rows)
        callback_metrics = self.trainer.callback_metrics
        epochs = int(callback_metrics.get(FinishedEpochs.KEY, self.trainer.current_epoch))
        return Fit(self.trainer, seconds, epochs, len(self.runs))

    def tester(self) -> L.Trainer:
        """The Trainer that tests: the pass's own, or after a multi-process fit one device's
        (see `single_device_trainer`)."""
        if self.trainer.world_size == 1:
            return self.trainer
        return single_device_trainer(self.cfg, self.folder)
