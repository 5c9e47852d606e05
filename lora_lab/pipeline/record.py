"""Record: the one place that turns a finished or failed run into a `RunResult` and writes it
(the run's `result.json`, then the study's `results.csv`)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pandas as pd
from omegaconf import DictConfig, OmegaConf

from lora_lab._atomic import atomic_write_text
from lora_lab.pipeline.methods import method_of
from lora_lab.pipeline.plan import PlannedRun
from lora_lab.report.selection import selected_mask
from lora_lab.results import RESULTS_CSV, find_results, results_frame, write_result

log = logging.getLogger(__name__)


def failed_result(run: PlannedRun, error: BaseException, pass_id: str = "") -> dict[str, Any]:
    """The row of a run that failed (or could not start), with the error's first line.

    Args:
        run: The planned run.
        error: What stopped it.
        pass_id: The training pass it belonged to; "" for a run trained on its own.
    """
    text = str(error).strip()
    return {
        "run_id": run.run_id,
        "stage": run.stage,
        "rank": run.rank,
        "alpha": float(run.cfg.lora.alpha) if run.stage == "lora" else None,
        "seed": run.seed,
        "learning_rate": float(run.cfg.module.optimizer.lr),
        "method": method_of(run.cfg.lora) if run.stage == "lora" else None,
        "run_dir": f"runs/{run.run_id}",
        "pass": pass_id or run.run_id,
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


def write_results_csv(root: str | Path) -> tuple[pd.DataFrame, list[str]]:
    """Rebuild `<root>/results.csv` from every `result.json` below `root`, atomically, with
    the `selected` column the report's learning-rate choice gives.

    Returns:
        The table and the corrupt-file messages from `find_results`.
    """
    results, problems = find_results(root)
    for problem in problems:
        log.warning(problem)
    frame = results_frame(results, select=selected_mask)
    atomic_write_text(Path(root) / RESULTS_CSV, frame.to_csv(index=False), fsync=True)
    return frame, problems
