"""The preflight: every check of a study, or of `lora-lab train`'s one stage, done once,
before anything trains or is written. Plain values first (`config_check`: no torch, so that
the command line refuses a bad value at once), then the plan's own rules, the `_target_`
arguments against their signatures, and what only built objects can check: the LoRA targets
injected into a throwaway network, each distinct data config built and its files found, each
stage's network, module, optimizer, loggers and Trainer built on no data.

Every check returns or raises `ConfigError`: each problem with its key, value and reason.
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
from collections import Counter
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

# The package, not its names: `lora_lab.lora` loads them (and torch) on first use, so the
# plain checks run before torch is imported.
from lora_lab import lora
from lora_lab.pipeline.config_check import HYDRA_KEYS, check_targets, check_values
from lora_lab.pipeline.methods import lora_config_of
from lora_lab.pipeline.plan import PlannedRun, plan
from lora_lab.pipeline.run_config import STAGES, stage_config
from lora_lab.pipeline.schema import NO_VALUE, ConfigError, Problem, raise_problems

if TYPE_CHECKING:
    from lora_lab.lora import LoRAConfig


def preflight(
    cfg: DictConfig,
    stage: str | None = None,
    build_trainer: bool = True,
    earlier: Sequence[Problem] = (),
) -> list[PlannedRun]:
    """Check a study (or one stage of it) once; the plan of a checked study.

    Args:
        cfg: The composed config.
        stage: None: the whole study (`lora-lab sweep`); a stage: `lora-lab train`'s one.
        build_trainer: False where the runs train on another machine (a cluster launcher):
            this one may lack their accelerator.
        earlier: Problems found before (the command line's, composing the config), said
            together with those of the plain values.

    Returns:
        The study's plan (empty for one stage).

    Raises:
        ConfigError: every problem of the plain values (with `earlier`); else every problem
            of the plan and the `_target_` arguments; else the first part that cannot be built.
    """
    # (a stage that is none is the plain values' problem: `stage` names one of STAGES)
    stages = STAGES if stage is None else tuple(s for s in (stage,) if s in STAGES)
    raise_problems([*earlier, *check_values(cfg, stages)])
    runs = plan(cfg) if stage is None else []
    raise_problems(check_plan(runs) + check_targets(cfg, stages))
    run_cfgs = [run.cfg for run in runs] or [stage_config(cfg, str(stage))]
    lora_cfgs = [run_cfg for run_cfg in run_cfgs if run_cfg.stage == "lora"]
    if lora_cfgs:
        check_lora(lora_cfgs)
    check_data(run_cfgs)
    check_builds(run_cfgs, build_trainer)
    return runs


def check_plan(runs: Sequence[PlannedRun]) -> list[Problem]:
    """A plan's own rules: one name per run, and one validation split, which no stage trains
    on (a stage's own `data` may not change the dataset, `val_size` or `split_seed`)."""
    problems = []
    repeated = sorted(n for n, count in Counter(r.run_id for r in runs).items() if count > 1)
    if repeated:
        reason = (
            f"lists the same run more than once ({', '.join(repeated)}); check sweep.ranks, "
            "sweep.alphas, sweep.learning_rates, sweep.methods and sweep.seeds for repeats"
        )
        problems.append(Problem("sweep", NO_VALUE, reason))
    for run in runs[1:]:
        for key in ("name", "val_size", "split_seed"):
            mine, theirs = run.cfg.data.get(key), runs[0].cfg.data.get(key)
            problem = Problem(
                f"stages.{run.stage}.data.{key}",
                mine,
                f"differs from the {runs[0].stage} stage's {theirs!r}: every stage must "
                f"validate on one split, which no stage trains on; set data.{key} for the "
                "whole study instead",
            )
            if mine != theirs and problem not in problems:
                problems.append(problem)
    return problems


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def check_lora(lora_cfgs: Sequence[DictConfig]) -> None:
    """Validate every LoRA run's LoRAConfig, and that its targets match layers of the network
    (by injecting into a throwaway network, before any training). Each method's largest rank
    is injected: PiSSA refuses a rank above a target layer's min(in, out)."""
    lora_logger = logging.getLogger("lora_lab.lora")
    level = lora_logger.level
    lora_logger.setLevel(logging.ERROR)  # size warnings belong to the real runs, not this check
    try:
        largest: dict[str, LoRAConfig] = {}
        for run_cfg in lora_cfgs:
            config = lora_config_of(run_cfg.lora)
            kind = repr(dataclasses.replace(config, rank=1, alpha=1))
            if kind not in largest or config.rank > largest[kind].rank:
                largest[kind] = config
        for config in largest.values():
            lora.inject_lora(instantiate(lora_cfgs[0].model), config)
    except ValueError as error:
        raise ConfigError.one("lora", NO_VALUE, _one_line(error)) from None
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
                reason = f"{_one_line(cause)} (the {run_cfg.stage} stage)"
                raise ConfigError.one("data", NO_VALUE, reason) from None


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
        ConfigError: naming the stage, the part that could not be built and, for a Trainer,
            the one key without which it builds.
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


def _build_trainer(node: DictConfig) -> None:
    instantiate(node, logger=False, enable_checkpointing=False)


def _culprit(trainer: DictConfig) -> str | None:
    """The one key of a Trainer config that cannot be built without which it builds (None:
    no key, or several, alone makes the difference)."""
    keys = [str(key) for key in trainer if key not in HYDRA_KEYS]
    found = []
    for key in keys:
        try:
            _build_trainer(OmegaConf.masked_copy(trainer, [k for k in trainer if k != key]))
        except Exception:
            continue
        found.append(key)
    return found[0] if len(found) == 1 else None


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
            _build_trainer(run_cfg.trainer)
    except Exception as error:
        error = error.__cause__ or error  # Hydra's InstantiationException wraps the cause
        reason = f"the {run_cfg.stage} stage's {part} cannot be built from the config: "
        reason += _one_line(error)
        key = _culprit(run_cfg.trainer) if part == "trainer" else None
        if key is None:
            raise ConfigError.one(part, NO_VALUE, reason) from None
        value = OmegaConf.to_container(run_cfg.trainer, resolve=True)[key]  # type: ignore[index]
        raise ConfigError.one(f"trainer.{key}", value, f"is not allowed: {reason}") from None
