"""The study: pretrain → full finetune → LoRA at every rank × seed → table, plots, report.

Every run writes its own `result.json`; `results.csv` is rebuilt from them after each run, so
the table on disk is always complete up to the last finished run. Re-running the same command
into the same `output_dir` skips finished runs and resumes interrupted ones (see `resume`).
"""

from __future__ import annotations

import copy
import datetime as dt
import json
import logging
import sys
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from lora_lab.lora import LoRAConfig, inject_lora
from lora_lab.pipeline.environment import environment
from lora_lab.pipeline.results import write_atomic, write_result, write_results_csv
from lora_lab.pipeline.resume import (
    CHECKPOINT_FILE,
    STUDY_FILE,
    check_study_dir,
    describe_previous,
    finished,
    run_identity,
    set_aside,
    study_config,
)
from lora_lab.pipeline.stages import StageRun, run_id_for, run_stage, stage_config

log = logging.getLogger(__name__)


class StudyError(ValueError):
    """Bad study input, found before any training starts."""


@dataclass
class PlannedRun:
    """One run of the study: its stage, seed, rank, per-run config and identity."""

    stage: str
    seed: int
    rank: int | None = None
    epochs: int = 0
    cfg: DictConfig = field(repr=False, default=None)  # type: ignore[assignment]
    run_id: str = ""
    identity: str = ""

    def label(self) -> str:
        if self.stage == "lora":
            return f"lora rank={self.rank} seed={self.seed}"
        return self.stage


def _ranks(cfg: DictConfig) -> list[int]:
    ranks = cfg.sweep.ranks
    if ranks is None or isinstance(ranks, (str, int)) or len(ranks) == 0:
        raise StudyError(
            f"sweep.ranks={ranks!r} must be a non-empty list of integers ≥ 1, e.g. sweep.ranks=[1,2,4,8]"
        )
    return list(ranks)


def plan(cfg: DictConfig) -> list[PlannedRun]:
    """The runs of a study, in order, with their per-run configs; validates before training.

    Raises:
        StudyError / ValueError: on bad input (bad ranks, bad LoRA values, targets that match
            nothing, bad data arguments), before anything is trained or written.
    """
    seeds = list(cfg.sweep.seeds) if cfg.sweep.seeds is not None else [int(cfg.seed)]
    if not seeds:
        raise StudyError("sweep.seeds=[] must list at least one seed, e.g. sweep.seeds=[0,1,2]")
    # `lora.rank` itself is replaced by each of sweep.ranks, but a bad value is still an error.
    LoRAConfig(**OmegaConf.to_container(cfg.lora, resolve=True))
    runs = [PlannedRun("pretrain", int(cfg.seed)), PlannedRun("full_finetune", int(cfg.seed))]
    runs += [PlannedRun("lora", int(seed), rank) for seed in seeds for rank in _ranks(cfg)]
    for run in runs:
        run.cfg = stage_config(cfg, run.stage, rank=run.rank, seed=run.seed)
        run.epochs = int(run.cfg.trainer.max_epochs)
        alpha = float(run.cfg.lora.alpha) if run.stage == "lora" else None
        run.run_id = run_id_for(run.stage, run.rank, alpha, run.seed)
        upstream = None if run.stage == "pretrain" else runs[0].identity
        run.identity = run_identity(run.cfg, upstream)
    check_lora(runs[-1].cfg, [run.cfg for run in runs if run.stage == "lora"])
    check_data([run.cfg for run in runs])
    return runs


def check_lora(stage_cfg: DictConfig, lora_cfgs: Sequence[DictConfig]) -> None:
    """Validate every run's LoRAConfig, and that the targets match layers of the network
    (by injecting into a throwaway network, before any training)."""
    for run_cfg in lora_cfgs:
        LoRAConfig(**OmegaConf.to_container(run_cfg.lora, resolve=True))
    lora_logger = logging.getLogger("lora_lab.lora")
    level = lora_logger.level
    lora_logger.setLevel(logging.ERROR)  # size warnings belong to the real runs, not this check
    try:
        config = LoRAConfig(**OmegaConf.to_container(stage_cfg.lora, resolve=True))
        inject_lora(instantiate(stage_cfg.model), config)
    finally:
        lora_logger.setLevel(level)


def check_data(run_cfgs: Sequence[DictConfig]) -> None:
    """Build each distinct data config once (no loading): bad class names, sizes or dataset
    arguments fail here, before any training."""
    seen: list[Any] = []
    for run_cfg in run_cfgs:
        data = OmegaConf.to_container(run_cfg.data, resolve=True)
        if data not in seen:
            seen.append(data)
            instantiate(run_cfg.data)


def _fmt_seconds(seconds: float) -> str:
    return str(dt.timedelta(seconds=round(max(seconds, 0.0))))


class Progress:
    """Prints `[4/10] lora rank=8 seed=0 … eta 0:00:42` above Lightning's own bar."""

    def __init__(self, runs: Sequence[PlannedRun]) -> None:
        self.runs = runs
        self.start = time.perf_counter()
        self.epochs_done = 0
        self.total_epochs = sum(run.epochs for run in runs)

    def begin(self, index: int) -> None:
        elapsed = time.perf_counter() - self.start
        if self.epochs_done:
            eta = _fmt_seconds(elapsed / self.epochs_done * (self.total_epochs - self.epochs_done))
        else:
            eta = "?"
        run = self.runs[index]
        print(
            f"[{index + 1}/{len(self.runs)}] {run.label()} … eta {eta}", file=sys.stderr, flush=True
        )

    def end(self, index: int) -> None:
        self.epochs_done += self.runs[index].epochs

    def skip(self, index: int) -> None:
        """A run finished earlier: say so, and leave it out of the time estimate."""
        run = self.runs[index]
        print(
            f"[{index + 1}/{len(self.runs)}] {run.label()} … done earlier, skipped",
            file=sys.stderr,
            flush=True,
        )
        self.total_epochs -= run.epochs


def _failed_result(run: PlannedRun, error: BaseException) -> dict[str, Any]:
    text = str(error).strip()
    return {
        "run_id": run.run_id,
        "stage": run.stage,
        "rank": run.rank,
        "alpha": float(run.cfg.lora.alpha) if run.stage == "lora" else None,
        "seed": run.seed,
        "learning_rate": float(run.cfg.module.optimizer.lr),
        "run_dir": f"runs/{run.run_id}",
        "status": "failed",
        "error": f"{type(error).__name__}: {text.splitlines()[0] if text else ''}",
        "identity": run.identity,
    }


def record(
    run_cfg: DictConfig, study_dir: Path, result: dict[str, Any], env: dict[str, Any]
) -> None:
    """Write a run's `result.json` (with its resolved config and environment)."""
    full = dict(result)
    full["config"] = OmegaConf.to_container(run_cfg, resolve=True)
    full["environment"] = env
    write_result(study_dir / result["run_dir"], full)


def execute(
    run: PlannedRun, study_dir: Path, env: dict[str, Any], **kwargs: Any
) -> tuple[dict[str, Any], StageRun | None]:
    """Run one planned run, catching its failure so the sweep can go on; write its result."""
    try:
        stage_run = run_stage(copy.deepcopy(run.cfg), study_dir, identity=run.identity, **kwargs)
        result = stage_run.result
    except Exception as error:  # a failed run is a result, not the end of the sweep
        log.debug("run %s failed", run.label(), exc_info=True)
        result, stage_run = _failed_result(run, error), None
        print(f"FAILED {run.label()}: {result['error']}", file=sys.stderr, flush=True)
        if logging.getLogger("lora_lab").isEnabledFor(logging.DEBUG):
            traceback.print_exc()
    record(run.cfg, study_dir, result, env)
    if result["status"] == "ok":
        # The result is safely on disk: the resume checkpoint has done its job.
        (study_dir / result["run_dir"] / CHECKPOINT_FILE).unlink(missing_ok=True)
    return result, stage_run


def _artefact(study_dir: Path, run: PlannedRun) -> Path:
    """The file a finished run leaves for later stages and for `lora-lab analyze`."""
    if run.stage == "lora":
        return (
            study_dir
            / "adapters"
            / f"rank_{run.rank}_seed_{run.seed}"
            / "adapter_model.safetensors"
        )
    return study_dir / "checkpoints" / f"{run.stage}.safetensors"


def prepare_study_dir(cfg: DictConfig, study_dir: Path) -> None:
    """Check the folder can take this study (see `check_study_dir`); on `sweep.restart=true`
    move a previous study's files aside, so nothing is lost."""
    check_study_dir(cfg, study_dir)
    if cfg.sweep.restart:
        moved = set_aside(study_dir)
        if moved is not None:
            print(f"sweep.restart=true: previous results moved to {moved}", file=sys.stderr)


def run_sweep(cfg: DictConfig, study_dir: Path, command: str = "lora-lab sweep") -> dict[str, Any]:
    """Run the whole study into `study_dir`, skipping runs finished earlier.

    Returns:
        `{"results": DataFrame, "failed": [run ids], "skipped": [run ids]}`.
    """
    runs = plan(cfg)
    study_dir.mkdir(parents=True, exist_ok=True)
    prepare_study_dir(cfg, study_dir)
    env = environment()
    study = {"command": command, "environment": env, "config": study_config(cfg)}
    write_atomic(study_dir / STUDY_FILE, json.dumps(study, indent=2, default=str) + "\n")
    progress = Progress(runs)
    pretrained = study_dir / "checkpoints" / "pretrain.safetensors"
    target_data = stage_config(cfg, "lora").data
    failed: list[str] = []
    skipped: list[str] = []
    for index, run in enumerate(runs):
        run_dir = study_dir / "runs" / run.run_id
        if finished(run_dir, run.identity) and _artefact(study_dir, run).is_file():
            progress.skip(index)
            skipped.append(run.run_id)
            continue
        progress.begin(index)
        note = describe_previous(run_dir)
        if note:
            print(f"    {note}", file=sys.stderr, flush=True)
        if run.stage != "pretrain" and "pretrain" in failed:
            result = _failed_result(run, RuntimeError("skipped: the pretrain stage failed"))
            record(run.cfg, study_dir, result, env)
        else:
            kwargs = (
                {"target_data": target_data}
                if run.stage == "pretrain"
                else {"pretrained": pretrained}
            )
            result, _ = execute(run, study_dir, env, **kwargs)
        if result["status"] != "ok":
            failed.append(result["run_id"])
        progress.end(index)
        write_results_csv(study_dir)
    frame, _ = write_results_csv(study_dir)
    finish_report(study_dir)
    if skipped:
        print(
            f"{len(skipped)} run(s) finished earlier were skipped (sweep.restart=true redoes them)",
            file=sys.stderr,
        )
    return {"results": frame, "failed": failed, "skipped": skipped}


def finish_report(study_dir: Path) -> None:
    """Draw the plots and write report.md from results files only."""
    from lora_lab.report import write_report

    write_report(study_dir)
