"""`train(cfg)`: one stage, as `lora-lab train` runs it (also under Hydra multirun)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from lora_lab.pipeline.environment import environment
from lora_lab.pipeline.results import write_results_csv
from lora_lab.pipeline.stages import StageRun, run_stage, stage_config
from lora_lab.pipeline.sweep import check_lora, record


def train(cfg: DictConfig, study_dir: Path) -> tuple[dict[str, Any], StageRun]:
    """Run the stage `cfg.stage` into `study_dir` and record its result.

    The finetune stages start from `cfg.pretrain_ckpt`. Errors are raised (not recorded),
    since a single run has no sweep to carry on with.

    Returns:
        The result row and the objects that produced it.
    """
    stage = cfg.stage
    run_cfg = stage_config(cfg, stage)
    pretrained = None
    if stage != "pretrain":
        if cfg.pretrain_ckpt is None:
            raise ValueError(
                f"stage={stage} needs pretrain_ckpt=<path to pretrain weights>, e.g. pretrain_ckpt=outputs/<study>/checkpoints/pretrain.safetensors"
            )
        pretrained = Path(cfg.pretrain_ckpt)
        if not pretrained.is_file():
            raise ValueError(f"pretrain_ckpt={str(pretrained)!r} does not exist")
    if stage == "lora":
        check_lora(run_cfg, [run_cfg])
    kwargs: dict[str, Any] = {"pretrained": pretrained}
    if stage == "pretrain":
        kwargs = {"target_data": stage_config(cfg, "lora").data}
    stage_run = run_stage(run_cfg, study_dir, **kwargs)
    record(run_cfg, study_dir, stage_run.result, environment())
    write_results_csv(study_dir)
    return stage_run.result, stage_run
