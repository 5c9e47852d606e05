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
import itertools
import json
import logging
import math
import sys
import time
import traceback
from collections import Counter
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
from lora_lab.pipeline.stages import (
    StageRun,
    adapter_name_for,
    run_id_for,
    run_stage,
    stage_config,
)

log = logging.getLogger(__name__)


class StudyError(ValueError):
    """Bad study input, found before any training starts."""


@dataclass
class PlannedRun:
    """One run of the study: its stage, seed, rank, per-run config and identity.

    `alpha` and `learning_rate` are set only when the sweep varies them (`sweep.alphas`,
    `sweep.learning_rates`); `adapter` is the LoRA run's folder under `adapters/`.
    """

    stage: str
    seed: int
    rank: int | None = None
    alpha: float | None = None
    learning_rate: float | None = None
    epochs: int = 0
    cfg: DictConfig = field(repr=False, default=None)  # type: ignore[assignment]
    run_id: str = ""
    identity: str = ""
    adapter: str = ""

    def label(self) -> str:
        if self.stage != "lora":
            return self.stage
        swept = f" alpha={self.alpha:g}" if self.alpha is not None else ""
        swept += f" lr={self.learning_rate:g}" if self.learning_rate is not None else ""
        return f"lora rank={self.rank}{swept} seed={self.seed}"


def _ranks(cfg: DictConfig) -> list[int]:
    ranks = cfg.sweep.ranks
    if ranks is None or isinstance(ranks, (str, int)) or len(ranks) == 0:
        raise StudyError(
            f"sweep.ranks={ranks!r} must be a non-empty list of integers ≥ 1, e.g. sweep.ranks=[1,2,4,8]"
        )
    return list(ranks)


def _grid(cfg: DictConfig, key: str, example: str) -> list[float | None]:
    """The values of an optional sweep dimension: `[None]` (not swept) for null or [].

    Raises:
        StudyError: for a value that is not a list of positive numbers.
    """
    values = cfg.sweep.get(key)
    if values is None:
        return [None]
    if isinstance(values, (str, int, float)):
        raise StudyError(f"sweep.{key}={values!r} must be a list, e.g. sweep.{key}={example}")
    for value in values:
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not math.isfinite(value)
            or value <= 0
        ):
            raise StudyError(
                f"sweep.{key} holds {value!r}; it must list positive numbers, e.g. sweep.{key}={example}"
            )
    return [float(value) for value in values] or [None]


def sweep_jobs(cfg: DictConfig) -> int:
    """`sweep.jobs`: how many runs go at a time (1 when absent).

    Raises:
        StudyError: for anything but an integer ≥ 1.
    """
    jobs = cfg.sweep.get("jobs", 1)
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise StudyError(f"sweep.jobs={jobs!r} must be an integer ≥ 1, e.g. sweep.jobs=2")
    return jobs


def plan(cfg: DictConfig) -> list[PlannedRun]:
    """The runs of a study, in order, with their per-run configs; validates before training.

    Raises:
        StudyError / ValueError: on bad input (bad ranks, bad LoRA values, targets that match
            nothing, bad data arguments), before anything is trained or written.
    """
    seeds = list(cfg.sweep.seeds) if cfg.sweep.seeds is not None else [int(cfg.seed)]
    if not seeds:
        raise StudyError("sweep.seeds=[] must list at least one seed, e.g. sweep.seeds=[0,1,2]")
    sweep_jobs(cfg)
    # `lora.rank` itself is replaced by each of sweep.ranks, but a bad value is still an error.
    LoRAConfig(**OmegaConf.to_container(cfg.lora, resolve=True))
    alphas = _grid(cfg, "alphas", "[1,8,32]")
    learning_rates = _grid(cfg, "learning_rates", "[1e-4,1e-3]")
    runs = [PlannedRun("pretrain", int(cfg.seed)), PlannedRun("full_finetune", int(cfg.seed))]
    runs += [
        PlannedRun("lora", int(seed), rank, alpha, learning_rate)
        for seed, rank, alpha, learning_rate in itertools.product(
            seeds, _ranks(cfg), alphas, learning_rates
        )
    ]
    # Names carry a swept dimension only when it has several values, so the default layout
    # (`lora_r8_a8_s0`, `adapters/rank_8_seed_0`) stays as it was.
    name_alpha, name_lr = len(alphas) > 1, len(learning_rates) > 1
    for run in runs:
        run.cfg = stage_config(
            cfg,
            run.stage,
            rank=run.rank,
            seed=run.seed,
            alpha=run.alpha,
            learning_rate=run.learning_rate,
        )
        run.epochs = int(run.cfg.trainer.max_epochs)
        alpha = float(run.cfg.lora.alpha) if run.stage == "lora" else None
        learning_rate = run.learning_rate if name_lr else None
        run.run_id = run_id_for(run.stage, run.rank, alpha, run.seed, learning_rate)
        if run.stage == "lora":
            run.adapter = adapter_name_for(
                run.rank, run.seed, run.alpha if name_alpha else None, learning_rate
            )
        upstream = None if run.stage == "pretrain" else runs[0].identity
        run.identity = run_identity(run.cfg, upstream)
    duplicates = sorted(n for n, count in Counter(r.run_id for r in runs).items() if count > 1)
    if duplicates:
        raise StudyError(
            f"the sweep lists the same run more than once ({', '.join(duplicates)}); "
            "check sweep.ranks, sweep.alphas, sweep.learning_rates and sweep.seeds for repeats"
        )
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
        return study_dir / "adapters" / run.adapter / "adapter_model.safetensors"
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
    if pooled:
        failed += _run_pooled(
            [runs[i] for i in pooled], pooled, study_dir, env, jobs, pretrained, progress
        )
    frame, _ = write_results_csv(study_dir)
    finish_report(study_dir)
    if skipped:
        print(
            f"{len(skipped)} run(s) finished earlier were skipped (sweep.restart=true redoes them)",
            file=sys.stderr,
        )
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
    from lora_lab.pipeline.fused import run_fused

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
        print(f"    {note}", file=sys.stderr, flush=True)


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

    print(
        f"sweep.jobs={jobs}: {len(runs)} run(s), up to {min(jobs, len(runs))} at a time, "
        f"{threads_per_job(jobs)} torch thread(s) each",
        file=sys.stderr,
        flush=True,
    )
    for run in runs:
        # Several progress bars cannot share one terminal line; the run headers remain.
        OmegaConf.update(run.cfg, "trainer.enable_progress_bar", False)

    def crashed(position: int, error: BaseException) -> dict[str, Any]:
        run = runs[position]
        result = _failed_result(run, error)
        record(run.cfg, study_dir, result, env)
        print(f"FAILED {run.label()}: {result['error']}", file=sys.stderr, flush=True)
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
