"""The sequential runner: one run of a stage (pretrain, full finetune or LoRA) under its own
Lightning Trainer, and `execute`, which runs a planned run and records it, failed or not.

A run is: its config → DataModule + network → LightningModule → a fresh Trainer → fit → test
→ artefact (weights or adapter) → a `RunResult`, a training pass of one run through the one
lifecycle every runner uses (`lifecycle`). `run_stage` returns the result and the built
objects so tests can inspect them.
"""

from __future__ import annotations

import copy
import logging
import traceback
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from lora_lab.models import TaskModule
from lora_lab.pipeline.console import say
from lora_lab.pipeline.lifecycle import RunSetup, TrainingPass
from lora_lab.pipeline.plan import PlannedRun
from lora_lab.pipeline.progress import Progress
from lora_lab.pipeline.record import failed_result, record, tested_fields
from lora_lab.results import DIVERGED, RunResult

log = logging.getLogger(__name__)

# Lightning prints a banner per Trainer and warns about num_workers=0 even though our batches
# are prebuilt tensors; for a sweep of many short runs that is noise, not information.
for _name in ("lightning.pytorch.utilities.rank_zero", "lightning.pytorch.accelerators.cuda"):
    logging.getLogger(_name).setLevel(logging.WARNING)
warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
warnings.filterwarnings("ignore", message=r".*smaller than the logging interval.*")
# A resumed or redone run reuses its folder on purpose (its log is merged back, see below).
warnings.filterwarnings("ignore", message=r".*Checkpoint directory .* exists and is not empty.*")
warnings.filterwarnings(
    "ignore", message=r".*Experiment logs directory .* exists and is not empty.*"
)
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated.*")


@dataclass
class StageRun:
    """What one run produced: its result and the objects that made it."""

    result: RunResult
    module: TaskModule
    datamodule: L.LightningDataModule
    trainer: L.Trainer


def run_test(
    trainer: L.Trainer, module: TaskModule, datamodule: L.LightningDataModule
) -> dict[str, Any]:
    """Test a trained module; returns its result's test columns (see `tested_fields`)."""
    metrics = trainer.test(module, datamodule=datamodule, verbose=False)[0]
    return tested_fields(metrics, module, datamodule)


def _test_stage(
    run_cfg: DictConfig,
    tester: L.Trainer,
    module: TaskModule,
    datamodule: L.LightningDataModule,
    target_data: DictConfig | None,
) -> tuple[dict[str, Any], float | None]:
    """Test columns, and for pretrain its own task's accuracy when the finetune data differ."""
    tested = run_test(tester, module, datamodule)
    if run_cfg.stage != "pretrain":
        return tested, None
    source_test_acc = tested["test_acc"]
    if target_data is not None and OmegaConf.to_container(
        target_data, resolve=True
    ) != OmegaConf.to_container(run_cfg.data, resolve=True):
        tested = run_test(tester, module, instantiate(target_data))
    return tested, source_test_acc


def run_stage(
    run_cfg: DictConfig,
    study_dir: Path,
    *,
    pretrained: Path | None = None,
    target_data: DictConfig | None = None,
    identity: str | None = None,
    run_id: str | None = None,
    adapter_name: str | None = None,
) -> StageRun:
    """Train and test one run; save its weights or adapter; return its result.

    Args:
        run_cfg: A config from `stage_config` (its `stage`, `seed`, `lora.rank` are this run's).
        study_dir: The study folder: runs go to `runs/<run_id>/`, pretrain and full-finetune
            weights to `checkpoints/`, adapters to `adapters/rank_<r>_seed_<s>/`.
        pretrained: Weights the finetune stages start from.
        target_data: For pretrain, the finetune stages' data config: when it differs from the
            pretrain data, `test_acc` is measured on it (accuracy before finetuning) and the
            pretrain task's own accuracy goes to `source_test_acc`.
        identity: The run's identity (`resume.run_identity`). With one, the run saves
            `last.ckpt` at the end of every epoch (only the latest is kept) and resumes from
            a `last.ckpt` left by an interrupted run with the same identity.
        run_id: The run's folder name; None derives it from stage, rank, alpha and seed.
        adapter_name: The LoRA adapter's folder under `adapters/`; None: `rank_<r>_seed_<s>`.

    Under a multi-process strategy (`trainer=ddp`) only `fit` runs in the spawned processes;
    everything else, every file write included, happens in this process, which is rank 0's
    parent. Testing then runs here on one device (see `single_device_trainer`).
    """
    run = RunSetup.open(
        run_cfg,
        study_dir,
        run_id=run_id,
        adapter=adapter_name,
        identity=identity,
        pretrained=pretrained,
    )
    module, datamodule = run.build()
    training = TrainingPass(
        run_cfg, run.run_dir, run_cfg.run_id, [run], identity=identity, loggers=run.loggers
    )
    fit = training.fit(module, datamodule)
    val_acc = fit.trainer.callback_metrics.get("val_acc")  # the last epoch's; read before testing
    tested, source_test_acc = _test_stage(
        run_cfg, training.tester(), module, datamodule, target_data
    )
    result = run.finish(
        module, datamodule, tested, fit, val_acc=val_acc, source_test_acc=source_test_acc
    )
    return StageRun(result=result, module=module, datamodule=datamodule, trainer=fit.trainer)


def execute(
    run: PlannedRun, study_dir: Path, env: dict[str, Any], **kwargs: Any
) -> tuple[RunResult, StageRun | None]:
    """Run one planned run and record it; a failure is caught and recorded as a failed result,
    so the study can go on.

    Args:
        run: The planned run.
        study_dir: The study folder.
        env: The environment recorded with the result.
        **kwargs: `pretrained` or `target_data`, as `run_stage` takes them.
    """
    try:
        stage_run = run_stage(
            copy.deepcopy(run.cfg),
            study_dir,
            identity=run.identity,
            run_id=run.run_id,
            adapter_name=run.adapter or None,
            **kwargs,
        )
        result = stage_run.result
    except Exception as error:  # a failed run is a result, not the end of the study
        log.debug("run %s failed", run.label(), exc_info=True)
        result, stage_run = failed_result(run, error), None
        if logging.getLogger("lora_lab").isEnabledFor(logging.DEBUG):
            traceback.print_exc()
    say_outcome(run, result)
    record(run.cfg, study_dir, result, env)
    return result, stage_run


def say_outcome(run: PlannedRun, result: RunResult) -> None:
    """One line for a run that did not finish `ok`: FAILED (an error) or DIVERGED (a result)."""
    if result.status == DIVERGED:
        say(f"DIVERGED {run.label()}: {result.error}", logging.WARNING)
    elif not result.ok:
        say(f"FAILED {run.label()}: {result.error}", logging.ERROR)


def run_sequential(
    indices: Sequence[int], progress: Progress, env: dict[str, Any], **kwargs: Any
) -> None:
    """Run the planned runs at `indices` one after another, each under its own Trainer.

    Args:
        indices: Positions in the plan (`progress.runs`).
        progress: The study's progress; told as each run starts and ends.
        env: The environment recorded with each result.
        **kwargs: `pretrained` or `target_data`, as `run_stage` takes them.
    """
    for index in indices:
        progress.begin(index)
        result, _ = execute(progress.runs[index], progress.study_dir, env, **kwargs)
        progress.end(index, result)


def record_skipped(
    indices: Sequence[int], progress: Progress, env: dict[str, Any], why: str
) -> None:
    """Record the runs at `indices` as failed without running them (their input is missing)."""
    for index in indices:
        progress.begin(index)
        run = progress.runs[index]
        result = failed_result(run, RuntimeError(f"skipped: {why}"))
        record(run.cfg, progress.study_dir, result, env)
        progress.end(index, result)
