"""LoRA methods as a sweep axis: the options of the `lora` config group (`conf/lora/`).

An option sets only the method keys (`METHOD_KEYS`) over `default`: `rslora` sets `use_rslora`,
`dora` sets `use_dora`, `pissa` sets `init`, `loraplus` sets `loraplus_lr_ratio`. A run of
`sweep.methods=[default,dora]` takes the study's `lora` settings (rank, alpha, targets, …) with
the method keys of its option.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from lora_lab.config_path import config_dir
from lora_lab.lora import LoRAConfig
from lora_lab.pipeline.schema import ConfigError, Problem

CONF_DIR = config_dir()
# The keys a method option sets; every other `lora.*` key is the study's.
METHOD_KEYS = ("method", "use_rslora", "use_dora", "init", "loraplus_lr_ratio")
# `lora.*` keys that are not LoRAConfig fields: the method's name and an optimizer setting.
EXTRA_KEYS = ("method", "loraplus_lr_ratio")


def available_methods(conf_dir: Path = CONF_DIR) -> list[str]:
    """The options of the `lora` config group, `default` first."""
    names = sorted(path.stem for path in (conf_dir / "lora").glob("*.yaml"))
    return sorted(names, key=lambda name: name != "default")


def method_patch(name: str, conf_dir: Path = CONF_DIR) -> dict[str, Any]:
    """The method keys of option `name`: `default`'s, with the option's own over them.

    Raises:
        ConfigError: naming the options there are.
    """
    problem = unknown_method([name], name, conf_dir)
    if problem is not None:
        raise ConfigError([problem])
    default, option = _option(conf_dir, "default"), _option(conf_dir, name)
    return {key: option.get(key, default.get(key)) for key in METHOD_KEYS}


def unknown_method(names: list[str], name: str, conf_dir: Path = CONF_DIR) -> Problem | None:
    """The problem of `sweep.methods=names` whose entry `name` is no option of `conf/lora/`."""
    known = available_methods(conf_dir)
    if name in known:
        return None
    reason = f"is not allowed: {name!r} is not a LoRA method; choose from {', '.join(known)}"
    return Problem("sweep.methods", names, reason)


@functools.cache
def _option(conf_dir: Path, name: str) -> dict[str, Any]:
    """The keys `conf/lora/<name>.yaml` sets itself, read once per process (a plan asks
    for them once per run)."""
    loaded = OmegaConf.to_container(OmegaConf.load(conf_dir / "lora" / f"{name}.yaml"))
    assert isinstance(loaded, dict)
    return {key: value for key, value in loaded.items() if key in METHOD_KEYS}


def lora_config_of(node: DictConfig | dict[str, Any]) -> LoRAConfig:
    """The LoRAConfig of a `lora` config node (its method name and LoRA+ ratio left out)."""
    plain = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node
    assert isinstance(plain, dict)
    return LoRAConfig(**{key: value for key, value in plain.items() if key not in EXTRA_KEYS})


def loraplus_ratio_of(node: DictConfig | dict[str, Any]) -> float | None:
    """`lora.loraplus_lr_ratio`: B's learning rate over A's (LoRA+), or None."""
    value = node.get("loraplus_lr_ratio")
    return None if value is None else float(value)


def method_of(node: DictConfig | dict[str, Any]) -> str:
    """`lora.method`: the option's name (`default` for configs written before methods)."""
    return str(node.get("method") or "default")
