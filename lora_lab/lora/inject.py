"""Wrap a model's layers with LoRA in place, and choose what trains.

The trainable set is built explicitly from the wrappers that `inject_lora` created, the
`modules_to_save` modules it resolved and the biases the `bias` mode names; nothing is chosen by
matching substrings of parameter names.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from torch import nn

from lora_lab.lora.config import LoRAConfig
from lora_lab.lora.dora import DoRAConv2d, DoRAEmbedding, DoRALinear
from lora_lab.lora.embedding import LoRAEmbedding
from lora_lab.lora.layers import LoRAConv2d, LoRALayer, LoRALinear
from lora_lab.lora.pissa import PiSSALinear
from lora_lab.lora.targets import ResolvedTargets, resolve_targets

logger = logging.getLogger("lora_lab.lora")

# The attribute under which the adapter's config lives on the model. A private, prefixed name so
# it cannot collide with a user's own `config` / `lora_config` attribute.
STATE_ATTR = "_lora_lab_adapter"


@dataclass(frozen=True)
class AdapterState:
    """What `inject_lora` stored on the model.

    Attributes:
        config: The config the adapter was built from.
        targets: Names of the wrapped layers.
        modules_to_save: Names of the modules trained and saved in full.
    """

    config: LoRAConfig
    targets: tuple[str, ...]
    modules_to_save: tuple[str, ...]


def lora_layers(model: nn.Module) -> dict[str, LoRALayer]:
    """Map module name -> LoRA wrapper, in model order.

    Args:
        model: Any module.

    Returns:
        An empty dict if the model has no LoRA layers.
    """
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALayer)}


def adapter_state(model: nn.Module) -> AdapterState | None:
    """The `AdapterState` stored by `inject_lora` / `load_adapter`, or None."""
    state = getattr(model, STATE_ATTR, None)
    return state if isinstance(state, AdapterState) else None


def lora_config(model: nn.Module) -> LoRAConfig | None:
    """The `LoRAConfig` of the adapter on `model`, or None if it has none."""
    state = adapter_state(model)
    return state.config if state is not None else None


def _bias_parameters(model: nn.Module, mode: str) -> list[nn.Parameter]:
    if mode == "all":
        return [
            param
            for module in model.modules()
            for name, param in module.named_parameters(recurse=False)
            if name == "bias"
        ]
    if mode == "lora_only":
        biases = (getattr(layer.base_layer, "bias", None) for layer in lora_layers(model).values())
        return [b for b in biases if isinstance(b, nn.Parameter)]
    return []


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters a LoRA finetune trains, collected explicitly.

    That is every wrapper's A and B (and DoRA's magnitude), every parameter of the `modules_to_save` modules and the
    biases selected by the config's `bias` mode. Shared parameters appear once.

    Args:
        model: A model returned by `inject_lora` / `load_adapter`.

    Returns:
        The parameters, in a deterministic order (pass them to the optimizer).
    """
    params: list[nn.Parameter] = []
    for layer in lora_layers(model).values():
        params.extend(layer.adapter_parameters())
    state = adapter_state(model)
    if state is not None:
        for name in state.modules_to_save:
            params.extend(model.get_submodule(name).parameters())
        params.extend(_bias_parameters(model, state.config.bias))
    unique: dict[int, nn.Parameter] = {}
    for param in params:
        unique.setdefault(id(param), param)
    return list(unique.values())


def mark_trainable(model: nn.Module) -> None:
    """Freeze every parameter, then unfreeze exactly `lora_parameters(model)`."""
    for param in model.parameters():
        param.requires_grad_(False)
    for param in lora_parameters(model):
        param.requires_grad_(True)


def _wrap(module: nn.Module, config: LoRAConfig) -> LoRALayer:
    if config.method == "pissa":
        return PiSSALinear(
            module,  # type: ignore[arg-type]  # resolve_targets checked it is an nn.Linear
            config.rank,
            config.alpha,
            dropout=config.dropout,
            use_rslora=config.use_rslora,
        )
    dora = config.method == "dora"
    if isinstance(module, nn.Embedding):
        embedding_cls = DoRAEmbedding if dora else LoRAEmbedding
        return embedding_cls(module, config.rank, config.alpha, config.use_rslora)
    layer_cls: type[LoRALinear | LoRAConv2d]
    if isinstance(module, nn.Conv2d):
        layer_cls = DoRAConv2d if dora else LoRAConv2d
    else:
        layer_cls = DoRALinear if dora else LoRALinear
    return layer_cls(
        module,  # type: ignore[arg-type]
        config.rank,
        config.alpha,
        dropout=config.dropout,
        use_rslora=config.use_rslora,
        init=config.init,
    )


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule called `name` (a dotted path, not "") by `module`."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


# (layer, adapter size, layer size) already warned about: a sweep builds the same adapter for
# every seed and method, and one warning says it.
_WARNED: set[tuple[str, int, int]] = set()


def _warn_if_oversized(name: str, layer: LoRALayer) -> None:
    adapter = sum(p.numel() for p in layer.adapter_parameters())
    base = sum(p.numel() for p in layer.base_layer.parameters())
    if adapter > base and (name, adapter, base) not in _WARNED:
        _WARNED.add((name, adapter, base))
        logger.warning(
            "LoRA adapter on %s has %d parameters, more than the %d of the layer it adapts "
            "(rank %d); a full finetune of this layer would be smaller",
            name,
            adapter,
            base,
            layer.rank,
        )


def apply_adapter(model: nn.Module, config: LoRAConfig, resolved: ResolvedTargets) -> None:
    """Wrap the resolved targets, store the state and set requires_grad (no validation)."""
    for name in resolved.targets:
        layer = _wrap(model.get_submodule(name), config)
        set_submodule(model, name, layer)
        _warn_if_oversized(name, layer)
    setattr(model, STATE_ATTR, AdapterState(config, resolved.targets, resolved.modules_to_save))
    mark_trainable(model)


def inject_lora(model: nn.Module, config: LoRAConfig) -> list[str]:
    """Wrap every layer matched by `config.target_modules` with LoRA, in place.

    Every parameter of the model is frozen; then only the adapters, the `modules_to_save`
    modules (kept in place, not copied) and the biases per `config.bias` are trainable.

    Args:
        model: Any module containing nn.Linear / nn.Conv2d / nn.Embedding layers.
        config: The adapter config; it is stored on the model for `save_adapter`.

    Returns:
        The names of the wrapped modules.

    Raises:
        ValueError: If the model already has LoRA layers, or targets do not resolve or do not
            support the method (see `resolve_targets`); nothing is changed then.
    """
    if not isinstance(config, LoRAConfig):
        raise ValueError(f"config must be a LoRAConfig, got {type(config).__name__}")
    existing = list(lora_layers(model))
    if existing:
        raise ValueError(
            f"model already has LoRA layers ({', '.join(existing[:5])}); inject once, "
            "or use load_adapter to replace the adapter"
        )
    resolved = resolve_targets(model, config)
    apply_adapter(model, config, resolved)
    return list(resolved.targets)


def remove_adapter(model: nn.Module) -> None:
    """Put each (unmerged) wrapper's base layer back in its place and forget the state.

    Base parameters stay frozen; the adapter tensors are dropped; a PiSSA layer's base gets
    its exact pretrained weight back.
    """
    layers = lora_layers(model)
    merged = [name for name, layer in layers.items() if layer.merged]
    if merged:
        raise ValueError(f"layer {merged[0]!r} is merged; unmerge before removing the adapter")
    for name, layer in layers.items():
        layer.restore_base()
        set_submodule(model, name, layer.base_layer)
    if hasattr(model, STATE_ATTR):
        delattr(model, STATE_ATTR)
