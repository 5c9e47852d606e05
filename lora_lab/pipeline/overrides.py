"""Which command-line overrides another key shadows, said in one line each.

The precedence rule (README "Overrides"): a stage's own setting wins over the shared one for
that stage. `stages.<stage>.max_epochs`, `.lr` and `.classes`, and the `stages.<stage>.data`,
`.module` and `.trainer` mappings, beat `trainer.*`, `module.*` and `data.*`; in a sweep, the
sweep's own axes (`sweep.ranks`, `sweep.alphas`, `sweep.learning_rates`, `sweep.seeds`) set
each LoRA run's rank, alpha, lr and seed. Experiments set shared values at the top level and
use `stages.*` only where the stages really differ, so a plain `trainer.max_epochs=1` reaches
every stage; where a config file's stage setting does win, these notes name both keys.

Also the overrides Hydra is handed: each job's under `-m` (`multirun_jobs`), and the output
folder the command line's preflight checked (`pinned_output_dir`).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf

from lora_lab.pipeline.run_config import SHORTCUTS, STAGES

# Top-level key → the `stages.<stage>.<shortcut>` that wins over it.
SHORTCUT_OF = {key: shortcut for shortcut, key in SHORTCUTS.items()}
MERGED_GROUPS = ("data", "module", "trainer")


def _show(value: Any) -> str:
    if isinstance(value, DictConfig) or OmegaConf.is_list(value):
        return str(OmegaConf.to_container(value))
    return str(value)


def _stage_shadow(cfg: DictConfig, key: str, stage: str) -> tuple[str, Any] | None:
    """The `stages.<stage>…` key (and its value) that wins over `key` for `stage`, if any."""
    if key in SHORTCUT_OF:
        shortcut = f"stages.{stage}.{SHORTCUT_OF[key]}"
        value = OmegaConf.select(cfg, shortcut, default=None)
        if value is not None:
            return shortcut, value
    group, *rest = key.split(".")
    node: Any = OmegaConf.select(cfg, f"stages.{stage}.{group}", default=None)
    path = f"stages.{stage}.{group}"
    for part in rest:
        if not isinstance(node, DictConfig) or part not in node:
            return None
        node, path = node[part], f"{path}.{part}"
        if not isinstance(node, DictConfig):
            return path, node
    return None


def _given(keys: Sequence[str], key: str) -> bool:
    """Whether the command line set `key` itself or a mapping holding it."""
    return any(key == given or key.startswith(f"{given}.") for given in keys)


def _sweep_shadow(cfg: DictConfig, key: str, keys: Sequence[str]) -> str | None:
    """Why a sweep's own axes leave `key` without effect on its LoRA runs, if they do."""
    sweep = cfg.sweep
    if key == "lora.rank":
        return f"each LoRA run's rank comes from sweep.ranks={_show(sweep.ranks)}"
    if key == "lora.alpha" and sweep.get("alphas"):
        return f"each LoRA run's alpha comes from sweep.alphas={_show(sweep.alphas)}"
    lr_keys = ("module.optimizer.lr", "stages.lora.lr", "stages.lora.module.optimizer.lr")
    if key in lr_keys and sweep.get("learning_rates"):
        return f"the LoRA runs' lr comes from sweep.learning_rates={_show(sweep.learning_rates)}"
    if key == "seed" and sweep.get("seeds") is not None and not _given(keys, "sweep.seeds"):
        return (
            f"it seeds pretrain and full_finetune; the LoRA runs' seeds come from "
            f"sweep.seeds={_show(sweep.seeds)}"
        )
    return None


def shadowed_overrides(cfg: DictConfig, overrides: Sequence[str], command: str) -> list[str]:
    """One line per command-line override that does not reach every run it names.

    Args:
        cfg: The composed config (with `overrides` applied).
        overrides: The Hydra overrides as typed (`key=value`; flags already removed).
        command: `sweep` (every stage) or `train` (`cfg.stage` only).
    """
    parsed: list[Override] = OverridesParser.create().parse_overrides(list(overrides))
    keys = [o.key_or_group for o in parsed if not o.is_delete() and "/" not in o.key_or_group]
    stages = STAGES if command == "sweep" else (str(cfg.stage),)
    notes = []
    for override in parsed:
        key = override.key_or_group
        if override.is_delete() or key not in keys:
            continue
        text = override.input_line or key
        reasons = []
        if key.split(".")[0] in MERGED_GROUPS and "." in key:
            for stage in stages:
                shadow = _stage_shadow(cfg, key, stage)
                if shadow is not None and not _given(keys, shadow[0]):
                    reasons.append(f"{shadow[0]}={_show(shadow[1])}")
        if reasons:
            notes.append(
                f"{text} is shadowed by {', '.join(reasons)} from the config (a stage's own "
                f"setting wins); override {'those' if len(reasons) > 1 else 'it'} too to change "
                "every stage"
            )
        why = _sweep_shadow(cfg, key, keys) if command == "sweep" else None
        if why is not None:
            notes.append(f"{text} does not reach the LoRA runs: {why}")
    return notes


def multirun_jobs(overrides: Sequence[str]) -> list[list[str]] | None:
    """The overrides of each job of a `-m` sweep, as Hydra's basic sweeper splits them: every
    combination of the swept values, in order (None under another sweeper, which decides its
    jobs as it goes).

    Raises:
        ValueError: in one line, for overrides Hydra cannot parse.
    """
    if any(arg.lstrip("+~").startswith(("hydra/sweeper=", "hydra.sweeper.")) for arg in overrides):
        return None
    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
        choices = [
            [f"{o.get_key_element()}={value}" for value in o.sweep_string_iterator()]
            if o.is_sweep_override()
            else [o.input_line]
            for o in parsed
        ]
    except HydraException as error:
        raise ValueError(" ".join(str(error).split())) from None
    return [list(job) for job in itertools.product(*choices)]


def pinned_output_dir(cfg: DictConfig | None, overrides: Sequence[str]) -> list[str]:
    """`output_dir=<the folder of cfg>` for Hydra, where the config computes the folder (the
    default `outputs/${name}_${now:…}`): Hydra composes the config again, and its `now` may
    name another folder than the one the preflight checked. Empty where the command line sets
    `output_dir`, for no config (`-m`), and for a folder name an override cannot carry."""
    if cfg is None or any(o.lstrip("+~").startswith("output_dir=") for o in overrides):
        return []
    folder = str(cfg.output_dir)
    if "$" in folder or "\\" in folder:
        return []
    return ["output_dir='" + folder.replace("'", "\\'") + "'"]
