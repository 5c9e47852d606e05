"""Resolve `target_modules` and `modules_to_save` to module names, without changing the model.

Matching runs on the model's *base view*: a module already wrapped by a `LoRALayer` is seen as
its base layer under the wrapper's name, and the adapter internals (`lora_A`, `base_layer`, ...)
are hidden. So the same config resolves to the same names before and after injection, which is
what a hot-swapping `load_adapter` needs.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from torch import nn

from lora_lab.lora.config import ALL_LINEAR, LoRAConfig
from lora_lab.lora.layers import SUPPORTED_TYPES, LoRALayer, check_conv_supported
from lora_lab.lora.pissa import check_pissa_target

logger = logging.getLogger("lora_lab.lora")

_MAX_LISTED = 40


@dataclass(frozen=True)
class ResolvedTargets:
    """The outcome of matching a config against a model.

    Attributes:
        targets: Names of the layers to wrap, in model order.
        modules_to_save: Names of the modules trained in full and saved with the adapter.
    """

    targets: tuple[str, ...]
    modules_to_save: tuple[str, ...]


def base_named_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Yield (name, module) as if every LoRA wrapper were still its base layer.

    Args:
        model: Any module, with or without LoRA layers.

    Yields:
        Pairs in `named_modules` order; the root has the name "".
    """
    stack: list[tuple[str, nn.Module]] = [("", model)]
    while stack:
        name, module = stack.pop()
        if isinstance(module, LoRALayer):
            yield name, module.base_layer
            continue
        yield name, module
        children = [
            (f"{name}.{child}" if name else child, sub) for child, sub in module.named_children()
        ]
        stack.extend(reversed(children))


def name_matches(name: str, wanted: Sequence[str]) -> bool:
    """True if `name` equals an entry or ends with "." + entry (PEFT's list semantics)."""
    return any(name == entry or name.endswith("." + entry) for entry in wanted)


def _inside(name: str, containers: Sequence[str]) -> bool:
    return any(name == c or name.startswith(c + ".") for c in containers)


def _listing(names: Sequence[str]) -> str:
    shown = ", ".join(names[:_MAX_LISTED]) or "(none)"
    more = len(names) - _MAX_LISTED
    return shown + (f", ... ({more} more)" if more > 0 else "")


def _check_shared(model: nn.Module, targets: Sequence[str]) -> None:
    """Refuse a target reachable under two names: wrapping one path would leave the other bare."""
    paths: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, SUPPORTED_TYPES):
            paths.setdefault(id(module), []).append(name)
    lookup = dict(base_named_modules(model))
    for name in targets:
        aliases = paths.get(id(lookup[name]), [])
        if len(aliases) > 1:
            raise ValueError(
                f"module {name!r} is shared under several names ({', '.join(aliases)}); "
                "LoRA cannot wrap a shared module"
            )


def _check_target(name: str, module: nn.Module, config: LoRAConfig) -> None:
    """Raise ValueError, naming the module, if `config`'s method cannot wrap `module`."""
    if not isinstance(module, SUPPORTED_TYPES):
        method = {"dora": "DoRA", "pissa": "PiSSA"}.get(config.method, "LoRA")
        raise ValueError(
            f"module {name!r} is a {type(module).__name__}; {method} supports only "
            f"{', '.join('nn.' + t.__name__ for t in SUPPORTED_TYPES)}"
        )
    if isinstance(module, nn.Conv2d):
        try:
            check_conv_supported(module)
        except ValueError as err:
            raise ValueError(f"module {name!r}: {err}") from None
    if config.method == "pissa":
        check_pissa_target(name, module, config.rank)


def resolve_targets(model: nn.Module, config: LoRAConfig) -> ResolvedTargets:
    """Match `config.target_modules` and `config.modules_to_save` against `model`.

    Args:
        model: The model (base view is used, see module docstring).
        config: The adapter config.

    Returns:
        The resolved names.

    Raises:
        ValueError: If nothing matches (the message lists the candidate layers), a matched
            module has an unsupported type (for PiSSA: is not an nn.Linear, or is smaller than
            the rank), a target lies inside a `modules_to_save` module, a `modules_to_save`
            entry matches nothing, or a target is shared / grouped.
    """
    modules = [(n, m) for n, m in base_named_modules(model) if n]
    candidates = [n for n, m in modules if isinstance(m, SUPPORTED_TYPES)]

    save_names: list[str] = []
    if config.modules_to_save:
        matched = [n for n, _ in modules if name_matches(n, config.modules_to_save)]
        # A module inside another saved module is saved with its parent already.
        save_names = [n for n in matched if not any(n.startswith(o + ".") for o in matched)]
        missing = [
            e for e in config.modules_to_save if not any(name_matches(n, [e]) for n in save_names)
        ]
        if missing:
            raise ValueError(
                f"modules_to_save entries {missing} match no module; modules: "
                f"{_listing([n for n, _ in modules])}"
            )

    lookup = dict(modules)
    spec = config.target_modules
    if spec == ALL_LINEAR:
        targets = []
        for name, module in modules:
            if not isinstance(module, nn.Linear) or _inside(name, save_names):
                continue
            parent = lookup.get(name.rpartition(".")[0], model)
            if isinstance(parent, nn.MultiheadAttention):
                # MultiheadAttention reads out_proj.weight directly; a wrapper would break it.
                logger.warning("all-linear: skipping %s inside nn.MultiheadAttention", name)
                continue
            targets.append(name)
    else:
        if isinstance(spec, str):
            targets = [n for n, _ in modules if re.fullmatch(spec, n)]
        else:
            targets = [n for n, _ in modules if name_matches(n, spec)]
            unused = [e for e in spec if not any(name_matches(n, [e]) for n in targets)]
            if targets and unused:
                logger.warning("target_modules entries %s match no module", unused)
        clashing = [n for n in targets if _inside(n, save_names)]
        if clashing:
            raise ValueError(
                f"target_modules match {clashing}, which are (inside) modules_to_save "
                f"{save_names}; a module is either adapted or saved in full, not both"
            )

    if not targets:
        raise ValueError(
            f"target_modules={spec!r} matched no module; candidate layers "
            f"(Linear/Conv2d/Embedding): {_listing(candidates)}"
        )
    for name in targets:
        _check_target(name, lookup[name], config)
    _check_shared(model, targets)
    return ResolvedTargets(targets=tuple(targets), modules_to_save=tuple(save_names))
