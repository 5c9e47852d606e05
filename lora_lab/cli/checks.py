"""The preflight of `sweep` and `train`: every check that can run before Hydra writes into
output_dir (`pipeline.preflight`: plain values first, before torch and Lightning load, then
what only built objects can check), and the output folder's."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lora_lab.cli.compose import compose_config

if TYPE_CHECKING:
    from omegaconf import DictConfig

    from lora_lab.pipeline.schema import Problem


@dataclass
class Checked:
    """What the preflight found: the notes to say, and the one job it composed and checked
    (not under `-m`, `--cfg` or `--help`), so that the job is not planned or built again.

    Attributes:
        notes: One line per command-line override that another key shadows.
        cfg: The job's composed config.
        runs: A sweep's plan of `cfg`, every check passed ([] for train).
        pinned: Overrides for Hydra that keep it to the job checked (`pinned_output_dir`).
    """

    notes: list[str] = field(default_factory=list)
    cfg: DictConfig | None = None
    runs: list[Any] | None = None
    pinned: list[str] = field(default_factory=list)

    def plan_of(self, cfg: DictConfig) -> list[Any] | None:
        """The preflight's plan when `cfg` (Hydra's) has the values it checked, else None."""
        from omegaconf import OmegaConf

        values = OmegaConf.to_container(cfg, resolve=True)
        if self.cfg is None or OmegaConf.to_container(self.cfg, resolve=True) != values:
            return None
        return self.runs


def preflight(command: str, parsed: argparse.Namespace) -> Checked:
    """Check everything that can be checked before Hydra runs and writes into output_dir:
    the config composes, every key has an allowed value, every stage builds, the data and
    checkpoints are there, and output_dir can take the study. Bad input leaves no new folder
    and an existing one untouched. Under `-m`, every job of the sweep is checked.

    The plain values are checked first, before torch and Lightning are imported, so that a
    bad one is refused at once; then what only built objects can check.

    Returns:
        The notes to say, and the job checked.
    """
    from lora_lab.pipeline.config_check import check_values
    from lora_lab.pipeline.overrides import multirun_jobs, pinned_output_dir, shadowed_overrides
    from lora_lab.pipeline.run_config import STAGES
    from lora_lab.pipeline.schema import raise_problems

    if any((parsed.cfg, parsed.info, parsed.help, parsed.hydra_help, parsed.shell_completion)):
        if not parsed.multirun:  # a bad value is refused here too (no torch: plain values)
            cfg, refused = compose_config(parsed)
            stages = STAGES if command == "sweep" else [s for s in STAGES if s == cfg.stage]
            raise_problems([*refused, *check_values(cfg, stages)])
        return Checked()  # Hydra prints and exits: nothing runs, nothing is written
    if not parsed.multirun:
        cfg, refused = compose_config(parsed)
        runs = check_job(command, cfg, None, refused=refused)
        notes = shadowed_overrides(cfg, parsed.overrides, command)
        return Checked(notes, cfg, runs, pinned_output_dir(cfg, parsed.overrides))
    jobs = multirun_jobs(parsed.overrides)
    # A cluster launcher (submitit, Ray) trains elsewhere: this machine may lack the jobs'
    # accelerator, so their Trainers are built where they run.
    launchers = [
        a.split("=", 1)[1] for a in parsed.overrides if a.lstrip("+~").startswith("hydra/launcher=")
    ]
    local = all(name in ("basic", "joblib") for name in launchers)
    notes: list[str] = []
    for index, job in enumerate(jobs or []):
        cfg, refused = compose_config(argparse.Namespace(**{**vars(parsed), "overrides": job}))
        folder = Path(str(cfg.output_dir)).expanduser()
        check_job(command, cfg, folder, build_trainer=local, refused=refused)
        if index == 0:
            notes = shadowed_overrides(cfg, job, command)
    return Checked(notes)


def check_job(
    command: str,
    cfg: DictConfig,
    sweep_dir: Path | None,
    build_trainer: bool = True,
    refused: Sequence[Problem] = (),
) -> list[Any]:
    """The checks of one study (`sweep`) or one stage (`train`); under `-m`, `sweep_dir` is
    the multirun folder that holds each job's folder. `refused`: the overrides Hydra refused
    (`compose_config`), said with the other problems. Returns a study's plan ([] for train).
    """
    from lora_lab.pipeline.preflight import preflight
    from lora_lab.pipeline.resume import check_output_dir, check_study_dir

    out = Path(str(cfg.output_dir)).expanduser()
    stage = None if command == "sweep" else str(cfg.stage)
    runs = preflight(cfg, stage, build_trainer, refused)
    if command == "train":
        from lora_lab.pipeline.train import pretrained_weights  # (imports torch)

        pretrained_weights(cfg)
    check_output_dir(sweep_dir or out)
    if command == "sweep" and sweep_dir is None:
        check_study_dir(cfg, out)
    return runs
