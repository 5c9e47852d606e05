"""The declared schema of the config, and the pass that checks a composed config against it.

Two sources declare what a key may hold:
- our own nodes (the top level, `sweep`, `stages.<stage>`, `lora`) are dataclasses below (and
  `LoRAConfig`), with the allowed range in each field's metadata;
- every `_target_` node (`data`, `model`, `module`, `module.optimizer`, `module.scheduler`,
  `trainer`) is checked against the signature of the class it instantiates (its type hints),
  plus the ranges in `RANGES`.

A bad value ends in one line naming the key, the value and what is allowed (`ConfigError`),
before anything trains or is written, under the name the user set (`stages.<stage>.…` too).
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

from hydra._internal.utils import _locate  # hydra.utils.get_class logs each failure as well
from omegaconf import DictConfig, OmegaConf

from lora_lab.lora import LoRAConfig
from lora_lab.pipeline.methods import EXTRA_KEYS
from lora_lab.pipeline.run_config import STAGES, stage_config


class ConfigError(ValueError):
    """A config value of the wrong type or out of range, found at compose time."""


Range = tuple[str, Callable[[Any], bool]]
AT_LEAST_1: Range = ("an integer ≥ 1", lambda v: v >= 1)
AT_LEAST_0: Range = ("an integer ≥ 0", lambda v: v >= 0)
POSITIVE: Range = ("a finite number > 0", lambda v: math.isfinite(v) and v > 0)
FRACTION: Range = ("a number in [0, 1)", lambda v: 0 <= v < 1)


def _bound(rng: Range) -> dict[str, Range]:
    return {"range": rng}


@dataclass
class SweepSchema:
    ranks: list[int] = field(metadata=_bound(AT_LEAST_1))
    seeds: list[int] | Literal["auto"] | None = None  # auto: rounds of seeds (`adaptive`)
    alphas: list[float] | None = field(default=None, metadata=_bound(POSITIVE))
    learning_rates: list[float] | None = field(default=None, metadata=_bound(POSITIVE))
    methods: list[str] | None = None
    jobs: int = field(default=1, metadata=_bound(AT_LEAST_1))
    fused: bool = True
    restart: bool = False
    lr_extend: int = field(default=2, metadata=_bound(AT_LEAST_0))
    verify: int = field(default=1, metadata=_bound(AT_LEAST_0))  # the exactness certificate
    verify_tolerance: float = field(default=0.005, metadata=_bound(POSITIVE))


@dataclass
class StageSchema:
    max_epochs: int | None = field(default=None, metadata=_bound(AT_LEAST_1))
    classes: list[int | str] | None = None
    lr: float | None = field(default=None, metadata=_bound(POSITIVE))
    learning_rates: list[float] | None = field(default=None, metadata=_bound(POSITIVE))
    data: dict[str, Any] = field(default_factory=dict)
    module: dict[str, Any] = field(default_factory=dict)
    trainer: dict[str, Any] = field(default_factory=dict)


@dataclass
class StudySchema:
    # Hydra reads `output_dir=2024` as an int: a folder name all the same.
    name: str | int
    seed: int
    output_dir: str | int
    stage: Literal["pretrain", "full_finetune", "lora"] = "lora"
    pretrain_ckpt: str | int | None = None
    threads: int | None = field(default=None, metadata=_bound(AT_LEAST_1))


@dataclass
class ReportSchema:
    tolerance: float = field(
        default=0.01, metadata=_bound(("a number in [0, 1)", lambda v: 0 <= v < 1))
    )
    max_seeds: int = field(default=10, metadata=_bound(("an integer ≥ 3", lambda v: v >= 3)))


@dataclass
class LoRAMethodSchema:
    """The `lora.*` keys beside LoRAConfig's fields (see pipeline.methods)."""

    method: str = "default"
    loraplus_lr_ratio: float | None = field(default=None, metadata=_bound(POSITIVE))


# Ranges of `_target_` arguments (their types come from the signatures).
RANGES: dict[str, Range] = {
    "trainer.max_epochs": AT_LEAST_1,
    "trainer.log_every_n_steps": AT_LEAST_1,
    "data.batch_size": AT_LEAST_1,
    "data.eval_batch_size": AT_LEAST_1,
    "data.val_size": AT_LEAST_0,
    "data.split_seed": AT_LEAST_0,
    "data.num_workers": AT_LEAST_0,
    "model.dropout": FRACTION,
    "module.optimizer.lr": POSITIVE,
    "module.optimizer.weight_decay": AT_LEAST_0,
}
# Keys whose signature allows null but a study does not.
NOT_NULL = {"trainer.max_epochs"}
HYDRA_KEYS = {"_target_", "_partial_", "_recursive_", "_convert_", "_args_"}


def describe(hint: Any) -> str:
    """A type hint in words: `int | None` → "an integer or null"."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType) and all(
        typing.get_origin(a) is Literal for a in args if a is not type(None)
    ):
        values = [v for a in args if a is not type(None) for v in typing.get_args(a)]
        words = "one of " + ", ".join(dict.fromkeys(str(v) for v in values))
        return words + (" or null" if type(None) in args else "")
    if origin in (Union, types.UnionType):
        # Classes a YAML value cannot be (torch.Tensor, Callback, …) are left unsaid.
        shown = [a for a in args if a is not type(None) and _is_plain_words(describe(a))]
        words = [describe(a) for a in shown or [a for a in args if a is not type(None)]]
        return " or ".join(dict.fromkeys(words)) + (" or null" if type(None) in args else "")
    if origin is Literal:
        return "one of " + ", ".join(str(a) for a in args)
    if origin in (list, tuple, Sequence) or hint in (list, tuple):
        inner = describe(args[0]) if args else "a value"
        if inner in _WORDS.values() and inner != "true or false":
            return f"a list of {inner.removeprefix('an ').removeprefix('a ')}s"
        return f"a list, each {inner}"
    if origin in (dict, Mapping) or hint is dict:
        return "a mapping"
    return _WORDS.get(hint, getattr(hint, "__name__", str(hint)))


_WORDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
_WORDS |= {Path: "a path", type(None): "null"}


def _is_plain_words(words: str) -> bool:
    """Whether `describe` gave a type a YAML value can have (not a class name)."""
    return words in _WORDS.values() or words.startswith(("a list", "one of", "a mapping"))


def conforms(value: Any, hint: Any) -> bool:
    """Whether a plain config value (from YAML or the command line) fits a type hint.

    Lists stand for tuples and sequences (YAML has no tuples), an int is a float, a string is
    a path; a bool is never a number. Hints a config value cannot take (classes such as
    `torch.Tensor`, callables) do not reject: instantiation checks those.
    """
    if hint is Any or isinstance(hint, (str, typing.TypeVar)):
        return True
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        return any(conforms(value, a) for a in args)
    if origin is Literal:
        return any(value == a and type(value) is type(a) for a in args)
    if hint is type(None) or value is None:
        return hint is type(None) and value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if hint is Path or (isinstance(hint, type) and issubclass(hint, Path)):
        return isinstance(value, (str, Path))
    sequence_types = (list, tuple, Sequence, typing.Iterable)
    if origin in sequence_types or hint in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(map(conforms, value, args))
        return not args or all(conforms(item, args[0]) for item in value)
    if origin in (dict, Mapping) or hint is dict:
        return isinstance(value, dict)
    if isinstance(hint, type) and isinstance(value, hint):
        return True
    # Another class: a mapping or list may still build one (a nested config); a plain
    # string or number never does.
    return not isinstance(value, (str, int, float, bool))


def _fail(key: str, value: Any, allowed: str) -> ConfigError:
    return ConfigError(f"{key}={value!r} is not allowed: it must be {allowed}")


def _check_type(key: str, value: Any, hint: Any, rng: Range | None) -> None:
    if not conforms(value, hint):
        if rng is not None:
            allowed = f"a list, each {rng[0]}" if describe(hint).startswith("a list") else rng[0]
            allowed += " (or null)" if "null" in describe(hint) and key not in NOT_NULL else ""
        else:
            allowed = describe(hint)
        raise _fail(key, value, allowed)


def _check_range(key: str, value: Any, rng: Range) -> None:
    """A number (or each number of a list) within `rng`; a range holds numbers only, so any
    other value is out of it. Null passes: whether a key may be null is its type's say."""
    if value is None:
        return
    listed = isinstance(value, (list, tuple))
    for item in value if listed else [value]:
        number = isinstance(item, (int, float)) and not isinstance(item, bool)
        if number and rng[1](item):
            continue
        if listed:
            raise ConfigError(
                f"{key}={value!r} is not allowed: it holds {item!r}, and each must be {rng[0]}"
            )
        raise _fail(key, value, rng[0])


def _check_value(key: str, value: Any, hint: Any, rng: Range | None) -> None:
    _check_type(key, value, hint, rng)
    if rng is not None:
        _check_range(key, value, rng)


def _check_dataclass(schema: type, node: Mapping[str, Any], prefix: str) -> None:
    hints = typing.get_type_hints(schema)
    for spec in dataclasses.fields(schema):
        if spec.name in node:
            rng = spec.metadata.get("range")
            _check_value(f"{prefix}{spec.name}", node[spec.name], hints[spec.name], rng)


def _signature_hints(target: str) -> tuple[dict[str, Any], bool]:
    """The typed parameters of what `target` names, and whether it takes **kwargs."""
    obj: Any = _locate(target)
    function = obj.__init__ if isinstance(obj, type) else obj
    try:
        hints = typing.get_type_hints(function)
    except Exception:  # some annotation names a TYPE_CHECKING-only import: resolve one by one
        hints = {}
        namespace = getattr(function, "__globals__", {})
        for name, parameter in inspect.signature(function).parameters.items():
            annotation = parameter.annotation
            try:
                hints[name] = (
                    eval(annotation, namespace) if isinstance(annotation, str) else annotation
                )
            except Exception:
                hints[name] = Any
    try:
        parameters = inspect.signature(obj).parameters
    except (TypeError, ValueError):  # a C type (datetime.timedelta, torch.device): no signature
        return {}, True
    takes_kwargs = any(p.kind is p.VAR_KEYWORD for p in parameters.values())
    typed = {name: hints.get(name, Any) for name in parameters if name != "self"}
    return typed, takes_kwargs


def _check_target(node: Mapping[str, Any], path: str, name_of: Callable[[str], str]) -> None:
    """Check a `_target_` node's arguments against the target's signature (recursively)."""
    target = node["_target_"]
    try:
        typed, takes_kwargs = _signature_hints(str(target))
    except Exception as error:  # hydra's get_class/get_method: the import failed
        raise ConfigError(
            f"{name_of(path + '._target_')}={target!r} cannot be imported "
            f"({' '.join(str(error).split())[:200]})"
        ) from None
    for key, value in node.items():
        if key in HYDRA_KEYS:
            continue
        child = f"{path}.{key}"
        if isinstance(value, Mapping) and "_target_" in value:
            _check_target(value, child, name_of)
        elif isinstance(value, list) and any(
            isinstance(v, Mapping) and "_target_" in v for v in value
        ):
            for index, item in enumerate(value):  # e.g. trainer.callbacks
                if isinstance(item, Mapping) and "_target_" in item:
                    _check_target(item, f"{child}[{index}]", name_of)
        elif key in typed:  # (the ranges in RANGES are checked with the plain values)
            _check_type(name_of(child), value, typed[key], RANGES.get(child))
        elif not takes_kwargs:
            allowed = ", ".join(sorted(typed))
            raise ConfigError(
                f"{name_of(child)}={value!r} is not allowed: {target} takes no argument "
                f"{key!r} (it takes: {allowed})"
            )


def _namer(cfg: DictConfig, stage: str) -> Callable[[str], str]:
    """Names a key of a stage's merged config as the user set it."""
    shortcuts = {"trainer.max_epochs": "max_epochs", "data.classes": "classes"}
    shortcuts["module.optimizer.lr"] = "lr"

    def name_of(path: str) -> str:
        short = shortcuts.get(path)
        if short is not None and OmegaConf.select(cfg, f"stages.{stage}.{short}") is not None:
            return f"stages.{stage}.{short}"
        if OmegaConf.select(cfg, f"stages.{stage}.{path}", default=None) is not None:
            return f"stages.{stage}.{path}"
        return path

    return name_of


def check_config(cfg: DictConfig, stages: Sequence[str] = STAGES) -> None:
    """Check every user-settable key of a composed config against the declared schema: its
    plain values (`check_values`), then the arguments of its `_target_` nodes
    (`check_targets`).

    Args:
        cfg: The composed config.
        stages: The stages whose merged configs are checked (`lora-lab train` checks one).

    Raises:
        ConfigError: one line naming the first bad key, its value and what is allowed.
    """
    check_values(cfg, stages)
    check_targets(cfg, stages)


def _stage_nodes(cfg: DictConfig, stage: str) -> dict[str, Any]:
    """A stage's merged config as plain values (run_dir and run_id, filled in per run and
    read by the loggers' save_dir, as placeholders)."""
    placeholders = {"run_dir": "<run_dir>", "run_id": "<run_id>"}
    merged = OmegaConf.to_container(
        OmegaConf.merge(stage_config(cfg, stage), placeholders), resolve=True
    )
    assert isinstance(merged, dict)
    return merged


def check_values(cfg: DictConfig, stages: Sequence[str] = STAGES) -> None:
    """The checks that need no imports: our own nodes (the top level, `sweep`, `report`,
    `stages.*`, `lora`) against their schemas and LoRAConfig's own checks, and the ranges of
    the `_target_` arguments in `RANGES` for each of `stages`. The command line runs them
    before torch is imported.

    Raises:
        ConfigError: one line naming the first bad key, its value and what is allowed.
    """
    plain = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(plain, dict)
    _check_dataclass(StudySchema, plain, "")
    _check_dataclass(SweepSchema, plain["sweep"], "sweep.")
    _check_dataclass(ReportSchema, plain.get("report") or {}, "report.")
    for stage in STAGES:
        _check_dataclass(StageSchema, plain["stages"][stage], f"stages.{stage}.")
    _check_dataclass(LoRAConfig, plain["lora"], "lora.")
    _check_dataclass(LoRAMethodSchema, plain["lora"], "lora.")
    try:
        LoRAConfig(**{k: v for k, v in plain["lora"].items() if k not in EXTRA_KEYS})
    except (TypeError, ValueError) as error:
        raise ConfigError(f"lora.{error}") from None
    for stage in stages:
        merged, name_of = _stage_nodes(cfg, stage), _namer(cfg, stage)
        for key, rng in RANGES.items():
            group, *path = key.split(".")
            node = merged.get(group)
            for part in path[:-1]:
                node = node.get(part) if isinstance(node, dict) else None
            if isinstance(node, dict) and path[-1] in node:
                _check_range(name_of(key), node[path[-1]], rng)
        if merged["trainer"].get("max_epochs") is None:
            raise _fail(
                name_of("trainer.max_epochs"),
                None,
                "an integer ≥ 1: every stage trains for a set number of epochs",
            )


def check_targets(cfg: DictConfig, stages: Sequence[str] = STAGES) -> None:
    """Check the arguments of each stage's `_target_` nodes (`data`, `model`, `module`,
    `trainer`, the loggers) against the signatures of what they name, which imports it.

    Raises:
        ConfigError: one line naming the first bad key, its value and what is allowed.
    """
    for stage in stages:
        merged, name_of = _stage_nodes(cfg, stage), _namer(cfg, stage)
        for group in ("data", "model", "module", "trainer"):
            if isinstance(merged.get(group), dict) and "_target_" in merged[group]:
                _check_target(merged[group], group, name_of)
        for name, node in (merged.get("logger") or {}).items():
            if isinstance(node, dict) and "_target_" in node:
                _check_target(node, f"logger.{name}", name_of)
