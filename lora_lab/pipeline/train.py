"""`train(cfg)`: one stage, as `lora-lab train` runs it (also under Hydra multirun)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig

from lora_lab.models import load_network_weights
from lora_lab.pipeline.environment import environment
from lora_lab.pipeline.preflight import preflight
from lora_lab.pipeline.record import record, write_results_csv
from lora_lab.pipeline.run_config import stage_config
from lora_lab.pipeline.sequential import StageRun, run_stage
from lora_lab.results import RunResult


def train_preflight(cfg: DictConfig, build_trainer: bool = True) -> Path | None:
    """Check a single-stage run before anything is written; returns its starting weights.

    Raises:
        ValueError: for a bad config (`preflight`'s ConfigError), and a `pretrain_ckpt` that
            is missing, corrupt or made for another architecture.
    """
    preflight(cfg, str(cfg.stage), build_trainer)
    return pretrained_weights(cfg)


def pretrained_weights(cfg: DictConfig) -> Path | None:
    """The weights a finetune stage starts from (`pretrain_ckpt`), checked: there, and made for
    this network; None for the pretrain stage.

    Raises:
        ValueError: for a `pretrain_ckpt` that is missing, corrupt or made for another
            architecture.
    """
    stage = str(cfg.stage)
    if stage == "pretrain":
        return None
    if cfg.pretrain_ckpt is None:
        raise ValueError(
            f"stage={stage} needs pretrain_ckpt=<path to pretrain weights>, "
            "e.g. pretrain_ckpt=outputs/<study>/checkpoints/pretrain.safetensors"
        )
    pretrained = Path(str(cfg.pretrain_ckpt)).expanduser()
    if not pretrained.is_file():
        raise ValueError(f"pretrain_ckpt={str(pretrained)!r} does not exist")
    # a corrupt file, or weights of another architecture
    load_network_weights(instantiate(stage_config(cfg, stage).model), pretrained)
    return pretrained


def train(cfg: DictConfig, study_dir: Path, checked: bool = False) -> tuple[RunResult, StageRun]:
    """Run the stage `cfg.stage` into `study_dir` and record its result.

    The finetune stages start from `cfg.pretrain_ckpt`. Errors are raised (not recorded),
    since a single run has no sweep to carry on with. `checked`: the command line's
    `train_preflight` checked this very config already.

    Returns:
        The result and the objects that produced it.
    """
    pretrained = train_preflight(cfg) if not checked else None
    if checked and cfg.stage != "pretrain":
        pretrained = Path(str(cfg.pretrain_ckpt)).expanduser()
    stage = cfg.stage
    run_cfg = stage_config(cfg, stage)
    kwargs: dict[str, Any] = {"pretrained": pretrained}
    if stage == "pretrain":
        kwargs = {"target_data": stage_config(cfg, "lora").data}
    stage_run = run_stage(run_cfg, study_dir, **kwargs)
    record(run_cfg, study_dir, stage_run.result, environment())
    write_results_csv(study_dir)
    return stage_run.result, stage_run
