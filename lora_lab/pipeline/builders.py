"""What every runner builds the same way: a run's LightningModule, and the one-device Trainer
that tests after a multi-device fit. The sequential and fused runners share them, so a fused
member starts exactly as its sequential run does."""

from __future__ import annotations

import copy
from pathlib import Path

import lightning as L
import torch
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, open_dict

from lora_lab.models import TaskModule, load_network_weights, lora_variant
from lora_lab.pipeline.methods import lora_config_of, loraplus_ratio_of


def build_module(
    run_cfg: DictConfig, network: torch.nn.Module, pretrained: Path | None
) -> TaskModule:
    """Instantiate the stage's LightningModule (the LoRA subclass for the LoRA stage)."""
    stage = run_cfg.stage
    if stage != "pretrain" and pretrained is None:
        raise ValueError(f"stage={stage} needs pretrain_ckpt=<weights file>; none was given")
    if stage == "lora":
        lora_class = lora_variant(get_class(run_cfg.module._target_))
        lora_config = lora_config_of(run_cfg.lora)
        # Built objects go to the partial, not through instantiate's kwargs (which would turn
        # the LoRAConfig dataclass into a config node).
        factory = instantiate(
            run_cfg.module,
            _target_=f"{lora_class.__module__}.{lora_class.__qualname__}",
            _partial_=True,
        )
        return factory(
            network=network,
            lora=lora_config,
            pretrained=str(pretrained),
            loraplus_lr_ratio=loraplus_ratio_of(run_cfg.lora),
        )
    if stage == "full_finetune":
        load_network_weights(network, pretrained)
    return instantiate(run_cfg.module, network=network)


def single_device_trainer(run_cfg: DictConfig, run_dir: Path) -> L.Trainer:
    """A one-device Trainer for testing after a multi-device fit.

    As Lightning advises, so that every test example counts once (a DistributedSampler pads
    the test set to a multiple of the device count); and it runs in this process, so the
    per-class accuracy the module keeps as an attribute is not lost in a spawned worker. No
    logger: a CSV logger created here would replace the metrics.csv the workers wrote.
    """
    trainer_cfg = copy.deepcopy(run_cfg.trainer)
    with open_dict(trainer_cfg):
        trainer_cfg.strategy, trainer_cfg.devices, trainer_cfg.num_nodes = "auto", 1, 1
        trainer_cfg.pop("callbacks", None)
    return instantiate(
        trainer_cfg,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        default_root_dir=str(run_dir),
    )


def devices_of(trainer_cfg: DictConfig) -> str:
    """Where and how a Trainer built from `trainer_cfg` trains, as Lightning resolves it (an
    `auto` accelerator included): e.g. `cuda:0, precision bf16-mixed` or
    `2 × cpu (DDPStrategy), precision 32-true`."""
    config = copy.deepcopy(trainer_cfg)
    with open_dict(config):
        config.pop("callbacks", None)
    trainer = instantiate(
        config, logger=False, enable_checkpointing=False, enable_progress_bar=False
    )
    strategy = trainer.strategy
    where = str(strategy.root_device)
    if trainer.num_devices > 1 or trainer.num_nodes > 1:
        nodes = f" on {trainer.num_nodes} nodes" if trainer.num_nodes > 1 else ""
        where = f"{trainer.num_devices} × {strategy.root_device.type}{nodes} ({type(strategy).__name__})"
    return f"{where}, precision {trainer.precision}"
