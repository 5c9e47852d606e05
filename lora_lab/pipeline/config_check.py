"""Check a composed config: every key of our own nodes against the schema (`schema`), every
`_target_` node's arguments against the signature of what it names, and the ranges of both.

Hydra types our own nodes as it composes (a bad type or an unknown key never composes); the
checks here return every problem found (`Problem`: key, value, reason), for `preflight` to
raise at once. Keys are named as the user set them (`stages.<stage>.…` too).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import importlib
import inspect
import types
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from omegaconf import DictConfig, OmegaConf

from lora_lab.pipeline.hints import conforms, describe
from lora_lab.pipeline.methods import lora_config_of, unknown_method
from lora_lab.pipeline.run_config import SHORTCUTS, STAGES, stage_config
from lora_lab.pipeline.schema import (
    AT_LEAST_0,
    AT_LEAST_1,
    FRACTION,
    NO_VALUE,
    POSITIVE,
    Problem,
    Range,
    StudySchema,
    raise_problems,
)

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


def _not_allowed(key: str, value: Any, allowed: str) -> Problem:
    return Problem(key, value, f"is not allowed: it must be {allowed}")


def _range_problem(key: str, value: Any, rng: Range) -> Problem | None:
    """A number (or each number of a list) within `rng`; a range holds numbers only, so any
    other value is out of it. Null passes: whether a key may be null is its type's say."""
    if value is None:
        return None
    listed = isinstance(value, (list, tuple))
    for item in value if listed else [value]:
        number = isinstance(item, (int, float)) and not isinstance(item, bool)
        if number and rng[1](item):
            continue
        if listed:
            return Problem(
                key, value, f"is not allowed: it holds {item!r}, and each must be {rng[0]}"
            )
        return _not_allowed(key, value, rng[0])
    return None


def _allowed(hint: Any, rng: Range | None, key: str = "") -> str:
    """What a key of type `hint` and range `rng` may hold, in words."""
    words = describe(hint)
    if rng is None:
        return words
    allowed = f"a list, each {rng[0]}" if words.startswith("a list") else rng[0]
    return allowed + (" (or null)" if "null" in words and key not in NOT_NULL else "")


# -- our own nodes ----------------------------------------------------------------------------


@functools.cache
def _fields(schema: type) -> dict[str, tuple[dataclasses.Field, Any]]:
    """A schema's fields and their types (a field's `hint` metadata where Hydra cannot type it)."""
    hints = typing.get_type_hints(schema)
    return {
        spec.name: (spec, spec.metadata.get("hint", hints[spec.name]))
        for spec in dataclasses.fields(schema)
    }


def schema_field(key: str) -> tuple[dataclasses.Field, Any] | None:
    """The schema field of a dotted key of our own nodes (`sweep.ranks`), and its type; None
    for a key of another node or no key at all."""
    schema: Any = StudySchema
    found = None
    for part in key.split("."):
        if not dataclasses.is_dataclass(schema) or part not in _fields(schema):
            return None
        found = _fields(schema)[part]
        schema = found[1]
    return found


def allowed_for(key: str) -> str | None:
    """What a key of our own nodes may hold, in words (None: not one of ours)."""
    found = schema_field(key)
    if found is None:
        return None
    spec, hint = found
    choices = spec.metadata.get("choices")
    return "one of " + ", ".join(choices) if choices else _allowed(hint, spec.metadata.get("range"))


def _schema_keys(schema: type = StudySchema, prefix: str = "") -> list[str]:
    """Every dotted key our own nodes declare."""
    keys = []
    for name, (_, hint) in _fields(schema).items():
        nested = dataclasses.is_dataclass(hint)
        keys += _schema_keys(hint, f"{prefix}{name}.") if nested else [prefix + name]
    return keys


def no_such_key(key: str, known: Iterable[str]) -> Problem:
    """An unknown key, with the nearest of the `known` keys beside it suggested (else a key of
    our own nodes elsewhere with a name near it: `rank` → `lora.rank`)."""
    parent, _, leaf = key.rpartition(".")
    known = sorted(known)
    close = [
        f"{parent + '.' if parent else ''}{k}" for k in difflib.get_close_matches(leaf, known, n=1)
    ]
    elsewhere = [k for k in _schema_keys() if not parent or not k.startswith(parent + ".")]
    by_leaf = {k.rpartition(".")[2]: k for k in elsewhere}
    close = close or [by_leaf[k] for k in difflib.get_close_matches(leaf, list(by_leaf), n=1)]
    if close:
        hint = f"did you mean {close[0]}?"
    else:
        hint = f"{parent or 'the top level'} takes {', '.join(known)}"
    return Problem(key, NO_VALUE, f"no such key; {hint}")


def known_keys(cfg: DictConfig | None, parent: str) -> list[str]:
    """The keys a node may hold: its schema's fields (our own nodes), else the keys it has in
    `cfg` (none without one)."""
    found = schema_field(parent) if parent else (None, StudySchema)
    if found is not None and dataclasses.is_dataclass(found[1]):
        return list(_fields(found[1]))
    node = (OmegaConf.select(cfg, parent) if parent else cfg) if cfg is not None else None
    return [str(k) for k in node] if isinstance(node, DictConfig) else []


def _check_field(key: str, value: Any, spec: dataclasses.Field, hint: Any) -> Problem | None:
    rng, choices = spec.metadata.get("range"), spec.metadata.get("choices")
    if choices is not None and value not in choices:
        return _not_allowed(key, value, "one of " + ", ".join(choices))
    if not conforms(value, hint):
        return _not_allowed(key, value, _allowed(hint, rng, key))
    return _range_problem(key, value, rng) if rng is not None else None


def _check_node(plain: Mapping[str, Any], schema: type, prefix: str = "") -> list[Problem]:
    """Every key of a node of ours: declared by its schema, of its type, choices and range."""
    problems: list[Problem] = []
    fields = _fields(schema)
    for key, value in plain.items():
        if key not in fields:
            if prefix or key != "hydra":  # Hydra's own node, where it is composed in
                problems.append(no_such_key(prefix + key, fields))
        elif dataclasses.is_dataclass(fields[key][1]) and isinstance(value, Mapping):
            problems += _check_node(value, fields[key][1], f"{prefix}{key}.")
        else:
            problem = _check_field(prefix + key, value, *fields[key])
            problems += [problem] if problem is not None else []
    return problems


def _sweep_rules(sweep: Mapping[str, Any]) -> list[Problem]:
    """What the sweep's types cannot say: lists that must not be empty, methods that exist."""
    problems = []
    if sweep.get("ranks") == []:
        problems.append(_not_allowed("sweep.ranks", [], "a non-empty list of integers ≥ 1"))
    if sweep.get("seeds") == []:
        problems.append(_not_allowed("sweep.seeds", [], "a list of at least one seed"))
    for name in sweep.get("methods") or []:
        problem = unknown_method(sweep["methods"], name)
        problems += [problem] if problem is not None else []
    return problems


def _namer(cfg: DictConfig, stage: str) -> Callable[[str], str]:
    """Names a key of a stage's merged config as the user set it."""
    shortcuts = {key: shortcut for shortcut, key in SHORTCUTS.items()}

    def name_of(path: str) -> str:
        short = shortcuts.get(path)
        if short is not None and OmegaConf.select(cfg, f"stages.{stage}.{short}") is not None:
            return f"stages.{stage}.{short}"
        if OmegaConf.select(cfg, f"stages.{stage}.{path}", default=None) is not None:
            return f"stages.{stage}.{path}"
        return path

    return name_of


def _stage_nodes(cfg: DictConfig, stage: str) -> dict[str, Any]:
    """A stage's merged config as plain values (run_dir and run_id, filled in per run and
    read by the loggers' save_dir, as placeholders)."""
    placeholders = {"run_dir": "<run_dir>", "run_id": "<run_id>"}
    merged = OmegaConf.to_container(
        OmegaConf.merge(stage_config(cfg, stage), placeholders), resolve=True
    )
    assert isinstance(merged, dict)
    return merged


def _stage_ranges(cfg: DictConfig, stage: str) -> list[Problem]:
    """The ranges in `RANGES` of a stage's merged config, and its epochs set."""
    merged, name_of = _stage_nodes(cfg, stage), _namer(cfg, stage)
    problems = []
    for key, rng in RANGES.items():
        group, *path = key.split(".")
        node = merged.get(group)
        for part in path[:-1]:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and path[-1] in node:
            problem = _range_problem(name_of(key), node[path[-1]], rng)
            problems += [problem] if problem is not None else []
    if merged["trainer"].get("max_epochs") is None:
        every = "an integer ≥ 1: every stage trains for a set number of epochs"
        problems.append(_not_allowed(name_of("trainer.max_epochs"), None, every))
    return problems


def check_values(cfg: DictConfig, stages: Sequence[str] = STAGES) -> list[Problem]:
    """The checks that need no imports: our own nodes (the top level, `sweep`, `report`,
    `stages.*`, `lora`) against the schema, LoRAConfig's own rules, and the ranges of the
    `_target_` arguments in `RANGES` for each of `stages`. The command line runs them before
    torch is imported.

    Returns:
        Every problem found (none: the values are fine).
    """
    plain = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(plain, dict)
    problems = _check_node(plain, StudySchema) + _sweep_rules(plain["sweep"])
    if not any(p.key.startswith("lora.") for p in problems):
        try:  # what the fields cannot say alone (DoRA with PiSSA, a bad regex, …)
            lora_config_of(plain["lora"])
        except (TypeError, ValueError) as error:
            problems.append(Problem("lora", NO_VALUE, " ".join(str(error).split())))
    for stage in stages:
        problems += _stage_ranges(cfg, stage)
    # `lora.alpha: ${lora.rank}` is bad where lora.rank is: said once, of the key that is set
    return [p for p in problems if not _interpolated(cfg, p.key)] or problems


def _interpolated(cfg: DictConfig, key: str) -> bool:
    """Whether `key` holds an interpolation (its value is another key's)."""
    parent, _, leaf = key.rpartition(".")
    node = OmegaConf.select(cfg, parent) if parent else cfg
    return isinstance(node, DictConfig) and leaf in node and OmegaConf.is_interpolation(node, leaf)


# -- `_target_` nodes -------------------------------------------------------------------------


def _import_target(path: str) -> Any:
    """What a dotted `_target_` names: its longest importable module, then attributes (as
    Hydra's private `_locate` does; the public `hydra.utils.get_class` logs each failure)."""
    parts = path.split(".")
    for cut in range(len(parts), 0, -1):
        module = ".".join(parts[:cut])
        try:
            found: Any = importlib.import_module(module)
        except ModuleNotFoundError as error:
            if cut > 1 and error.name is not None and module.startswith(error.name):
                continue  # not a module: an attribute of a shorter one
            raise
        for attribute in parts[cut:]:
            found = getattr(found, attribute)
        return found
    raise ImportError(f"no module named {path!r}")


def _hint_of(annotation: Any, namespace: dict[str, Any]) -> Any:
    """One parameter's annotation as a type (Any where it names a TYPE_CHECKING-only import,
    which makes `typing.get_type_hints` of the whole function fail)."""
    if not isinstance(annotation, str):
        return annotation
    holder = types.SimpleNamespace(__annotations__={"hint": annotation})
    try:
        return typing.get_type_hints(holder, globalns=namespace)["hint"]
    except Exception:
        return Any


def _signature_hints(target: str) -> tuple[dict[str, Any], bool]:
    """The typed parameters of what `target` names, and whether it takes **kwargs."""
    obj = _import_target(target)
    function = obj.__init__ if isinstance(obj, type) else obj
    try:
        parameters = inspect.signature(obj).parameters
    except (TypeError, ValueError):  # a C type (datetime.timedelta, torch.device): no signature
        return {}, True
    try:
        hints = typing.get_type_hints(function)
    except Exception:  # some annotation names a TYPE_CHECKING-only import: one by one
        namespace = getattr(function, "__globals__", {})
        hints = {
            name: _hint_of(p.annotation, namespace)
            for name, p in inspect.signature(function).parameters.items()
        }
    takes_kwargs = any(p.kind is p.VAR_KEYWORD for p in parameters.values())
    typed = {name: hints.get(name, Any) for name in parameters if name != "self"}
    return typed, takes_kwargs


def _check_target(
    node: Mapping[str, Any], path: str, name_of: Callable[[str], str]
) -> list[Problem]:
    """A `_target_` node's arguments against the target's signature (recursively)."""
    target = node["_target_"]
    try:
        typed, takes_kwargs = _signature_hints(str(target))
    except Exception as error:  # the import failed
        reason = f"cannot be imported ({' '.join(str(error).split())[:200]})"
        return [Problem(name_of(path + "._target_"), target, reason)]
    problems = []
    for key, value in node.items():
        child = f"{path}.{key}"
        nested = [value] if isinstance(value, Mapping) else value
        if key in HYDRA_KEYS:
            continue
        if isinstance(nested, list) and any(
            isinstance(v, Mapping) and "_target_" in v for v in nested
        ):
            for index, item in enumerate(nested):  # e.g. trainer.callbacks
                if isinstance(item, Mapping) and "_target_" in item:
                    where = child if isinstance(value, Mapping) else f"{child}[{index}]"
                    problems += _check_target(item, where, name_of)
        elif key in typed:  # (the ranges in RANGES are checked with the plain values)
            if not conforms(value, typed[key]):
                allowed = _allowed(typed[key], RANGES.get(child), child)
                problems.append(_not_allowed(name_of(child), value, allowed))
        elif not takes_kwargs:
            reason = f"is not allowed: {target} takes no argument {key!r} (it takes: "
            problems.append(Problem(name_of(child), value, reason + ", ".join(sorted(typed)) + ")"))
    return problems


def check_targets(cfg: DictConfig, stages: Sequence[str] = STAGES) -> list[Problem]:
    """The arguments of each stage's `_target_` nodes (`data`, `model`, `module`, `trainer`,
    the loggers) against the signatures of what they name, which imports it.

    Returns:
        Every problem found, each once (stages share most nodes).
    """
    problems: list[Problem] = []
    for stage in stages:
        merged, name_of = _stage_nodes(cfg, stage), _namer(cfg, stage)
        nodes = [(group, merged.get(group)) for group in ("data", "model", "module", "trainer")]
        nodes += [(f"logger.{name}", node) for name, node in (merged.get("logger") or {}).items()]
        for path, node in nodes:
            if isinstance(node, dict) and "_target_" in node:
                problems += [p for p in _check_target(node, path, name_of) if p not in problems]
    return problems


def check_config(cfg: DictConfig, stages: Sequence[str] = STAGES) -> None:
    """Check a composed config: its plain values (`check_values`), then the arguments of its
    `_target_` nodes (`check_targets`).

    Args:
        cfg: The composed config.
        stages: The stages whose merged configs are checked (`lora-lab train` checks one).

    Raises:
        ConfigError: every problem found, plain values first.
    """
    raise_problems(check_values(cfg, stages))
    raise_problems(check_targets(cfg, stages))
