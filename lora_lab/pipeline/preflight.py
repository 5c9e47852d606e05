"""The preflight checks that need built objects: the LoRA targets injected into a throwaway
network, each distinct data config built and its files found, each stage's network, module,
optimizer, loggers and Trainer built on no data, and every `_target_` argument checked against
its signature. They run once, after `plan`, before anything trains or is written."""

from __future__ import annotations

import dataclasses
import logging
import re
import tempfile
from collections.abc import Sequence
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from lora_lab.lora import LoRAConfig, inject_lora
from lora_lab.pipeline.config_check import ConfigError, check_targets
from lora_lab.pipeline.methods import lora_config_of
from lora_lab.pipeline.plan import PlannedRun


def check_study(cfg: DictConfig, runs: Sequence[PlannedRun], build_trainer: bool = True) -> None:
    """Everything about a planned study that only built objects can check.

    Args:
        cfg: The composed study config.
        runs: Its plan (`plan.plan`).
        build_trainer: False where the runs train on another machine (a cluster launcher):
            this one may lack their accelerator.

    Raises:
        ValueError: one line, on a bad `_target_` argument, LoRA targets that match nothing,
            bad data arguments or files, or a stage that cannot be built.
    """
    check_targets(cfg)
    check_lora(runs[-1].cfg, [run.cfg for run in runs if run.stage == "lora"])
    check_data([run.cfg for run in runs])
    check_builds([run.cfg for run in runs], build_trainer)


def check_lora(stage_cfg: DictConfig, lora_cfgs: Sequence[DictConfig]) -> None:
    """Validate every run's LoRAConfig, and that the targets match layers of the network
    (by injecting into a throwaway network, before any training). Each method's largest rank
    is injected: PiSSA refuses a rank above a target layer's min(in, out)."""
    lora_logger = logging.getLogger("lora_lab.lora")
    level = lora_logger.level
    lora_logger.setLevel(logging.ERROR)  # size warnings belong to the real runs, not this check
    try:
        largest: dict[str, LoRAConfig] = {}
        for run_cfg in [stage_cfg, *lora_cfgs]:
            config = lora_config_of(run_cfg.lora)
            kind = repr(dataclasses.replace(config, rank=1, alpha=1))
            if kind not in largest or config.rank > largest[kind].rank:
                largest[kind] = config
        for config in largest.values():
            inject_lora(instantiate(stage_cfg.model), config)
    except ValueError as error:
        message = " ".join(str(error).split())
        field = message.split(" ")[0].split("=")[0]
        named = field in {f.name for f in dataclasses.fields(LoRAConfig)}
        raise ConfigError(f"lora.{message}" if named else f"lora: {message}") from None
    finally:
        lora_logger.setLevel(level)


def check_data(run_cfgs: Sequence[DictConfig]) -> None:
    """Build each distinct data config once and check its files are there (without reading
    them): bad class names, sizes, dataset arguments or a missing dataset fail here, before
    any training."""
    seen: list[Any] = []
    for run_cfg in run_cfgs:
        data = OmegaConf.to_container(run_cfg.data, resolve=True)
        if data not in seen:
            seen.append(data)
            try:
                datamodule = instantiate(run_cfg.data)
                if hasattr(datamodule, "check_source"):
                    datamodule.check_source()
            except Exception as error:
                cause = error.__cause__ or error  # Hydra's InstantiationException wraps it
                if not isinstance(cause, ValueError):
                    raise
                where = f" (the {run_cfg.stage} stage)" if run_cfg.get("stage") else ""
                message = " ".join(str(cause).split())
                raise ConfigError(f"data{where}: {message}") from None


def check_builds(run_cfgs: Sequence[DictConfig], build_trainer: bool = True) -> None:
    """Build each distinct stage's network, LightningModule, optimizer, scheduler, loggers and
    Trainer once, on no data: what only the objects themselves check (an lr torch rejects, an
    accelerator this machine lacks, a logger whose package is missing) fails here, before any
    training.

    Args:
        run_cfgs: The runs' configs.
        build_trainer: False where the runs train on another machine (a cluster launcher):
            this one may lack their accelerator.

    Raises:
        ConfigError: naming the stage, the part that could not be built and, where the
            error names one, the key.
    """
    seen: list[Any] = []
    quiet = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric")]
    levels = [each.level for each in quiet]
    for run_cfg in run_cfgs:
        key = [run_cfg.stage] + [
            OmegaConf.to_container(run_cfg[group], resolve=True)
            for group in ("model", "module", "trainer")
        ]
        if key in seen:
            continue
        seen.append(key)
        for each in quiet:  # "GPU available: …" belongs to the real runs
            each.setLevel(logging.ERROR)
        try:
            _build_stage(run_cfg, build_trainer)
        finally:
            for each, level in zip(quiet, levels, strict=True):
                each.setLevel(level)


def _build_stage(run_cfg: DictConfig, build_trainer: bool) -> None:
    part = "module"
    try:
        module = instantiate(run_cfg.module, network=instantiate(run_cfg.model))
        part = "module.optimizer / module.scheduler"
        module.configure_optimizers()
        part = "logger"
        with tempfile.TemporaryDirectory() as run_dir:  # loggers write nothing until they log
            placeholders = OmegaConf.merge(run_cfg, {"run_dir": run_dir, "run_id": "preflight"})
            for node in (placeholders.get("logger") or {}).values():
                instantiate(node)
        if build_trainer:
            part = "trainer"
            instantiate(run_cfg.trainer, logger=False, enable_checkpointing=False)
    except Exception as error:
        error = error.__cause__ or error  # Hydra's InstantiationException wraps the cause
        message = " ".join(str(error).split()) or type(error).__name__
        named = [  # the trainer keys (or their values) the error speaks of
            f"{part}.{key}={value!r}"
            for key, value in (run_cfg.get(part) or {}).items()
            if part == "trainer"
            and (
                re.search(rf"\b{re.escape(str(key))}\b", message)
                or (
                    isinstance(value, str)
                    and len(value) > 2
                    and re.search(rf"\b{re.escape(value)}\b", message, re.I)
                )
            )
        ]
        where = f"{', '.join(named)}: " if named else ""
        raise ConfigError(
            f"{where}the {run_cfg.stage} stage's {part} cannot be built from the config: {message}"
        ) from None
