"""The study, in outline: plan → pretrain → full finetune and LoRA (fused, pooled or one by
one) → rounds of grid steps and seeds (`adaptive`) → table, plots, report.

Every run writes its own `result.json` (`record`); `results.csv` is rebuilt from them as each
run ends, so the table on disk is always complete up to the last finished run. Re-running the
same command into the same `output_dir` skips finished runs and resumes interrupted ones (see
`resume`). With `sweep.fused=true` (the default) LoRA runs that can share a pass train in one
(`fused`); with `sweep.jobs=N` the other runs after pretrain go N at a time through a process
pool (`parallel`); what is written is the same. Last, `sweep.verify` fused members are retrained
alone for the exactness certificate (`certificate`).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from lora_lab._atomic import atomic_write_text
from lora_lab.pipeline.adaptive import grow
from lora_lab.pipeline.builders import devices_of
from lora_lab.pipeline.certificate import certify
from lora_lab.pipeline.console import say
from lora_lab.pipeline.environment import environment
from lora_lab.pipeline.fused import PASSES, train_fused
from lora_lab.pipeline.fusion import fusable
from lora_lab.pipeline.parallel import run_pooled
from lora_lab.pipeline.plan import PlannedRun
from lora_lab.pipeline.preflight import preflight
from lora_lab.pipeline.progress import Progress
from lora_lab.pipeline.record import write_results_csv
from lora_lab.pipeline.resume import STUDY_FILE, check_study_dir, set_aside, study_config
from lora_lab.pipeline.run_config import stage_config
from lora_lab.pipeline.sequential import record_skipped, run_sequential
from lora_lab.report import write_report

PRETRAINED = Path("checkpoints") / "pretrain.safetensors"


def run_sweep(
    cfg: DictConfig,
    study_dir: Path,
    command: str = "lora-lab sweep",
    runs: Sequence[PlannedRun] | None = None,
) -> dict[str, Any]:
    """Run the whole study into `study_dir`, skipping runs finished earlier.

    Args:
        cfg: The composed study config.
        study_dir: The study folder.
        command: The command line, recorded in `study.json`.
        runs: The plan of this very config, checked by `preflight` already (the command
            line's), so that nothing is planned or built twice; None: it is checked and
            planned here.

    Returns:
        `{"results": DataFrame, "failed": [run ids], "diverged": [run ids], "skipped":
        [run ids], "certificate": verify.json's content}`; a diverged run is a result, not a
        failure; a certificate whose `passed` is False is one (`certificate.certify`).
    """
    if runs is None:
        runs = preflight(cfg)  # every check; every run, its config, identity and name
    say_devices(runs)
    env = open_study(cfg, study_dir, command)
    progress = Progress(runs, study_dir, cfg.sweep.jobs)

    def train(indices: list[int]) -> None:
        train_runs(cfg, indices, progress, env)

    train(progress.skip_finished())
    if "pretrain" not in progress.failed + progress.diverged:
        grow(cfg, progress, train)  # grid steps past an edge choice; sweep.seeds=auto's rounds

    if not progress.failed:  # a pass that failed left its folder; its runs went on their own
        shutil.rmtree(study_dir / PASSES, ignore_errors=True)
    certificate = certify(cfg, progress.runs, study_dir, study_dir / PRETRAINED)
    frame, _ = write_results_csv(study_dir)
    write_report(study_dir)
    if progress.skipped:
        say(
            f"{len(progress.skipped)} run(s) finished earlier were skipped "
            "(sweep.restart=true redoes them)"
        )
    if progress.diverged:  # a result, not a failure: the study still exits 0
        say(
            f"{len(progress.diverged)} run(s) diverged (status diverged in results.csv; never "
            f"chosen, never averaged in): {', '.join(progress.diverged)}"
        )
    return {
        "results": frame,
        "failed": progress.failed,
        "diverged": progress.diverged,
        "skipped": progress.skipped,
        "certificate": certificate,
    }


def train_runs(
    cfg: DictConfig, indices: list[int], progress: Progress, env: dict[str, Any]
) -> None:
    """Train the runs at `indices` of the plan: pretrain, then the full finetunes and the LoRA
    runs (fused where they can, `sweep.jobs` at a time where asked); after a failed pretrain
    the others are recorded as skipped."""
    runs = progress.runs
    pretrain = [i for i in indices if runs[i].stage == "pretrain"]
    others = [i for i in indices if runs[i].stage == "full_finetune"]
    lora = [i for i in indices if runs[i].stage == "lora"]
    grouping = fusable([runs[i] for i in lora]) if cfg.sweep.get("fused", False) else None
    if grouping is not None:  # the time left counts these runs as passes
        progress.expect_passes(grouping[0])

    run_sequential(pretrain, progress, env, target_data=stage_config(cfg, "lora").data)
    if "pretrain" in progress.failed + progress.diverged:  # no weights to start from
        record_skipped(others + lora, progress, env, "the pretrain stage failed")
        return
    pretrained, jobs = progress.study_dir / PRETRAINED, cfg.sweep.jobs
    if jobs == 1:
        run_sequential(others, progress, env, pretrained=pretrained)
        others = []
    if grouping is not None:
        lora = train_fused(lora, progress, pretrained, env, grouping)
    if jobs == 1:
        run_sequential(lora, progress, env, pretrained=pretrained)
    else:
        run_pooled(others + lora, progress, env, jobs, pretrained)


def say_devices(runs: list[PlannedRun]) -> None:
    """The study's first line: the device and precision each stage trains on (one line when
    the stages share them), as Lightning resolves `trainer.accelerator=auto`."""
    where: dict[str, list[str]] = {}
    for stage in dict.fromkeys(run.stage for run in runs):
        trainer_cfg = next(run.cfg.trainer for run in runs if run.stage == stage)
        where.setdefault(devices_of(trainer_cfg), []).append(stage)
    if len(where) == 1:
        say(f"training on {next(iter(where))}")
        return
    for devices, stages in where.items():
        say(f"training {', '.join(stages)} on {devices}")


def open_study(cfg: DictConfig, study_dir: Path, command: str) -> dict[str, Any]:
    """Make the study folder ready and write `study.json`; returns the environment recorded
    with every result.

    The folder must be able to take this study (see `check_study_dir`); on
    `sweep.restart=true` a previous study's files are moved aside, so nothing is lost.
    """
    study_dir.mkdir(parents=True, exist_ok=True)
    check_study_dir(cfg, study_dir)
    if cfg.sweep.restart:
        moved = set_aside(study_dir)
        if moved is not None:
            say(f"sweep.restart=true: previous results moved to {moved}")
    env = environment()
    study = {"command": command, "environment": env, "config": study_config(cfg)}
    text = json.dumps(study, indent=2, default=str) + "\n"
    atomic_write_text(study_dir / STUDY_FILE, text, fsync=True)
    return env
