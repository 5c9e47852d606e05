"""Record: the rows of finished and failed runs, written as each run's `result.json`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from lora_lab.pipeline.methods import method_of
from lora_lab.pipeline.plan import PlannedRun
from lora_lab.pipeline.results import write_result


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
