"""`lora-lab sweep` and `lora-lab train`: the preflight, then the Hydra app that runs the
study or the stage (torch and Lightning are imported only where training starts)."""

from __future__ import annotations

import logging
import os
import shlex
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lora_lab.cli.checks import Checked, preflight
from lora_lab.cli.compose import hydra_args, typed_values
from lora_lab.cli.errors import guard
from lora_lab.config_path import CONFIG_NAME, config_search_path

if TYPE_CHECKING:
    from omegaconf import DictConfig


def hydra_command(command: str, args: list[str], debug: bool) -> int:
    import hydra
    from hydra.core.hydra_config import HydraConfig

    from lora_lab.pipeline.schema import register_schema

    exit_code = 0
    command_line = shlex.join(["lora-lab", command, *args])
    parent = os.getpid()
    checked = Checked()

    def task(cfg: DictConfig) -> None:
        # Where training starts: torch and Lightning are imported here, not before.
        from lora_lab.pipeline.console import say
        from lora_lab.pipeline.parallel import JobFailed
        from lora_lab.pipeline.train import train

        nonlocal exit_code
        study_dir = Path(HydraConfig.get().runtime.output_dir)
        for note in checked.notes:
            say(f"note: {note}")

        def body() -> int:
            if command == "sweep":
                # the preflight's plan; None under -m, where each job checks itself
                return run_study(cfg, study_dir, command_line, checked.plan_of(cfg))
            result, _ = train(cfg, study_dir, checked=checked.plan_of(cfg) is not None)
            say(f"{result.summary()} → {study_dir}")
            return 0

        code = guard(body, debug)
        exit_code = max(exit_code, code)
        if code and os.getpid() != parent:
            # Launchers that run jobs elsewhere (joblib, submitit, Ray) never see exit_code:
            # fail the job, so that Hydra reports it and the parent exits non-zero.
            raise JobFailed(f"lora-lab {command}: a job exited with code {code} (error above)")

    try:
        parsed = hydra_args(args)
    except SystemExit as stop:  # argparse has printed the usage and the problem
        return stop.code if isinstance(stop.code, int) else 2

    typed: dict[str, Any] = {}  # the values the command line gave, shown as typed

    def check() -> int:
        nonlocal checked
        register_schema()  # for Hydra's compositions: the preflight's, and hydra.main's
        typed.update(typed_values(parsed.overrides))
        checked = preflight(command, parsed)
        return 0

    code = guard(check, debug, typed)
    if code:
        return code
    sys.argv = [f"lora-lab {command}", *args, *checked.pinned]
    app = hydra.main(config_path=config_search_path(), config_name=CONFIG_NAME, version_base="1.3")
    try:
        app(task)()
    except SystemExit as stop:  # Hydra exits 1 after printing a failed job's JobFailed
        return max(exit_code, stop.code if isinstance(stop.code, int) else 1)
    return exit_code


def run_study(cfg: DictConfig, study_dir: Path, command_line: str, runs: list | None) -> int:
    """`lora-lab sweep`'s job: the study, its folder and failures said, and its answer last.

    Returns:
        The exit code: 1 if a run failed or the exactness certificate failed, else 0.
    """
    from lora_lab.pipeline.console import say
    from lora_lab.pipeline.sweep import run_sweep
    from lora_lab.report.certificate import certificate_line

    summary = run_sweep(cfg, study_dir, command_line, runs)
    say(f"study written to {study_dir} (results.csv, accuracy_vs_rank.png, report.md)")
    failed = summary["failed"]
    if failed:
        say(f"{len(failed)} run(s) failed: {', '.join(failed)}", logging.ERROR)
    say_recommendation(study_dir, cfg)
    certificate = summary.get("certificate") or {}
    if certificate.get("passed") is False:  # the last line: fused training was not exact
        say(certificate_line(certificate), logging.ERROR)
        return 1
    return 1 if failed else 0


def say_recommendation(study_dir: Path, cfg: DictConfig) -> None:
    """The study's answer, as its last line(s): the recommended rank of each method, judged
    as its report judges it (`report.tolerance`, and the level of `sweep.seeds=auto`)."""
    from lora_lab.pipeline.console import say
    from lora_lab.report.verdict import recommend, study_confidence
    from lora_lab.results import read_results

    try:
        frame = read_results(study_dir / "results.csv")
    except ValueError:  # no usable table (every run failed): the failures were said above
        return
    tolerance = float(cfg.report.tolerance)
    auto = cfg.sweep.get("seeds") == "auto"
    confidence = study_confidence(auto, int(cfg.report.get("max_seeds") or 10))
    for recommendation in recommend(frame, tolerance, confidence):
        say(recommendation.sentence(tolerance))
