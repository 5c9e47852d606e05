"""The study: pretrain → full finetune → LoRA at every rank × alpha × learning rate × seed →
table, plots, report.

Every run writes its own `result.json`; `results.csv` is rebuilt from them after each run, so
the table on disk is always complete up to the last finished run. Re-running the same command
into the same `output_dir` skips finished runs and resumes interrupted ones (see `resume`).
With `sweep.jobs=N` the runs after pretrain go N at a time through a process pool (see
`parallel`); what is written is the same.
"""

from __future__ import annotations

import copy
import datetime as dt
import json
import logging
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from lora_lab._atomic import atomic_write_text
from lora_lab.pipeline.console import say
from lora_lab.pipeline.environment import environment
from lora_lab.pipeline.fused import run_fused
from lora_lab.pipeline.plan import PlannedRun, plan, sweep_jobs
from lora_lab.pipeline.record import failed_result, record, write_results_csv
from lora_lab.pipeline.resume import (
    CHECKPOINT_FILE,
    STUDY_FILE,
    check_study_dir,
    describe_previous,
    finished,
    set_aside,
    study_config,
)
from lora_lab.pipeline.stages import StageRun, run_stage, stage_config

log = logging.getLogger(__name__)


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
        say(f"[{index + 1}/{len(self.runs)}] {run.label()} … eta {eta}")

    def end(self, index: int) -> None:
        self.epochs_done += self.runs[index].epochs

    def skip(self, index: int) -> None:
        """A run finished earlier: say so, and leave it out of the time estimate."""
        run = self.runs[index]
        say(f"[{index + 1}/{len(self.runs)}] {run.label()} … done earlier, skipped")
        self.total_epochs -= run.epochs


def execute(
    run: PlannedRun, study_dir: Path, env: dict[str, Any], **kwargs: Any
) -> tuple[dict[str, Any], StageRun | None]:
    """Run one planned run, catching its failure so the sweep can go on; write its result."""
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
    except Exception as error:  # a failed run is a result, not the end of the sweep
        log.debug("run %s failed", run.label(), exc_info=True)
        result, stage_run = failed_result(run, error), None
        say(f"FAILED {run.label()}: {result['error']}", logging.ERROR)
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
        return study_dir / "adapters" / run.adapter / "adapter_model.safetensors"
    return study_dir / "checkpoints" / f"{run.run_id}.safetensors"


def prepare_study_dir(cfg: DictConfig, study_dir: Path) -> None:
    """Check the folder can take this study (see `check_study_dir`); on `sweep.restart=true`
    move a previous study's files aside, so nothing is lost."""
    check_study_dir(cfg, study_dir)
    if cfg.sweep.restart:
        moved = set_aside(study_dir)
        if moved is not None:
            say(f"sweep.restart=true: previous results moved to {moved}")


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
    text = json.dumps(study, indent=2, default=str) + "\n"
    atomic_write_text(study_dir / STUDY_FILE, text, fsync=True)
    progress = Progress(runs)
    pretrained = study_dir / "checkpoints" / "pretrain.safetensors"
    target_data = stage_config(cfg, "lora").data
    failed: list[str] = []
    skipped: list[str] = []
    jobs = sweep_jobs(cfg)
    pooled: list[int] = []  # with sweep.jobs > 1: the runs after pretrain, run in a pool below
    fused: dict[str, dict[str, Any]] | None = None  # sweep.fused=true: run id -> fused result
    for index, run in enumerate(runs):
        run_dir = study_dir / "runs" / run.run_id
        if fused is None and run.stage == "lora" and cfg.sweep.get("fused", False):
            fused = _run_fused(runs[index:], study_dir, pretrained, env, failed)
        if fused and run.run_id in fused:
            if fused[run.run_id]["status"] != "ok":
                failed.append(run.run_id)
            progress.end(index)
            continue
        if finished(run_dir, run.identity) and _artefact(study_dir, run).is_file():
            progress.skip(index)
            skipped.append(run.run_id)
            continue
        if jobs > 1 and run.stage != "pretrain" and "pretrain" not in failed:
            pooled.append(index)
            continue
        _begin(progress, index, run_dir)
        if run.stage != "pretrain" and "pretrain" in failed:
            result = failed_result(run, RuntimeError("skipped: the pretrain stage failed"))
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
    if pooled:
        failed += _run_pooled(
            [runs[i] for i in pooled], pooled, study_dir, env, jobs, pretrained, progress
        )
    frame, _ = write_results_csv(study_dir)
    finish_report(study_dir)
    if skipped:
        say(f"{len(skipped)} run(s) finished earlier were skipped (sweep.restart=true redoes them)")
    return {"results": frame, "failed": failed, "skipped": skipped}


def _run_fused(
    runs: Sequence[PlannedRun],
    study_dir: Path,
    pretrained: Path,
    env: dict[str, Any],
    failed: list[str],
) -> dict[str, dict[str, Any]]:
    """Train the unfinished LoRA runs among `runs` in fused groups (`lora_lab.pipeline.fused`);
    runs it cannot fuse are named in one line and left to the sequential loop."""
    if "pretrain" in failed:
        return {}  # nothing to start from: the loop records the skipped runs
    pending = [
        run
        for run in runs
        if run.stage == "lora"
        and not (
            finished(study_dir / "runs" / run.run_id, run.identity)
            and _artefact(study_dir, run).is_file()
        )
    ]
    results, _sequential = run_fused(pending, study_dir, pretrained, env)
    for result in results:  # as `execute` does: a stale resume checkpoint has no use now
        if result["status"] == "ok":
            (study_dir / result["run_dir"] / CHECKPOINT_FILE).unlink(missing_ok=True)
    write_results_csv(study_dir)
    return {result["run_id"]: result for result in results}


def _begin(progress: Progress, index: int, run_dir: Path) -> None:
    """Announce a run as it starts, with a note on any earlier attempt in its folder."""
    progress.begin(index)
    note = describe_previous(run_dir)
    if note:
        say(f"    {note}")


def _run_pooled(
    runs: list[PlannedRun],
    indices: list[int],
    study_dir: Path,
    env: dict[str, Any],
    jobs: int,
    pretrained: Path,
    progress: Progress,
) -> list[str]:
    """Run `runs` (at `indices` of the plan) `jobs` at a time; returns the failed run ids."""
    from lora_lab.pipeline.parallel import run_in_pool, threads_per_job

    say(
        f"sweep.jobs={jobs}: {len(runs)} run(s), up to {min(jobs, len(runs))} at a time, "
        f"{threads_per_job(min(jobs, len(runs)))} torch thread(s) each"
    )
    for run in runs:
        # Several progress bars cannot share one terminal line; the run headers remain.
        OmegaConf.update(run.cfg, "trainer.enable_progress_bar", False)

    def crashed(position: int, error: BaseException) -> dict[str, Any]:
        run = runs[position]
        result = failed_result(run, error)
        record(run.cfg, study_dir, result, env)
        say(f"FAILED {run.label()}: {result['error']}", logging.ERROR)
        return result

    failed: list[str] = []
    for position, result in run_in_pool(
        runs,
        study_dir,
        jobs=jobs,
        pretrained=pretrained,
        on_start=lambda position: _begin(
            progress, indices[position], study_dir / "runs" / runs[position].run_id
        ),
        on_crash=crashed,
    ):
        if result["status"] != "ok":
            failed.append(result["run_id"])
        progress.end(indices[position])
        write_results_csv(study_dir)
    return failed


def finish_report(study_dir: Path) -> None:
    """Draw the plots and write report.md from results files only."""
    from lora_lab.report import write_report

    write_report(study_dir)
