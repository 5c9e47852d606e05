"""Which tensors an adapter file holds, by PEFT key (without the `base_model.model.` prefix).

`adapter_keys` lists the live tensors of a model's adapter (for saving and as copy targets when
loading). `expected_shapes` predicts the same keys and shapes for a config that is not applied
yet, so `load_adapter` can validate a file before it changes the model.
"""

from __future__ import annotations

from torch import Size, Tensor, nn

from lora_lab.lora.config import LoRAConfig
from lora_lab.lora.inject import AdapterState, lora_layers
from lora_lab.lora.targets import ResolvedTargets, base_named_modules


def _inside(name: str, containers: tuple[str, ...]) -> bool:
    return any(name == c or name.startswith(c + ".") for c in containers)


def module_tensors(module: nn.Module) -> dict[str, Tensor]:
    """The parameters and persistent buffers of `module` as its base model would name them.

    Like `module.state_dict(keep_vars=True)`, but LoRA wrappers inside are seen as their base
    layers, so the keys do not depend on whether an adapter is currently injected.
    """
    tensors: dict[str, Tensor] = {}
    for name, sub in base_named_modules(module):
        prefix = f"{name}." if name else ""
        for key, param in sub.named_parameters(recurse=False):
            tensors[prefix + key] = param
        skipped = getattr(sub, "_non_persistent_buffers_set", set())
        for key, buffer in sub.named_buffers(recurse=False):
            if key not in skipped:
                tensors[prefix + key] = buffer
    return tensors


def _bias_tensors(
    model: nn.Module, mode: str, targets: tuple[str, ...], saved: tuple[str, ...]
) -> dict[str, Tensor]:
    """Bias parameters by PEFT key: `<layer>.base_layer.bias` when wrapped, else `<module>.bias`."""
    if mode == "none":
        return {}
    wrapped = set(targets)
    biases: dict[str, Tensor] = {}
    for name, module in base_named_modules(model):
        if not name or _inside(name, saved):
            continue  # modules_to_save store their biases with their own state
        if mode == "lora_only" and name not in wrapped:
            continue
        bias = dict(module.named_parameters(recurse=False)).get("bias")
        if bias is not None:
            biases[f"{name}.base_layer.bias" if name in wrapped else f"{name}.bias"] = bias
    return biases


def adapter_keys(model: nn.Module, state: AdapterState) -> dict[str, Tensor]:
    """Live tensors of the adapter on `model`, keyed as in PEFT files (prefix omitted).

    Args:
        model: A model holding an adapter.
        state: Its stored `AdapterState`.

    Returns:
        Adapter factors, `modules_to_save` state and biases per the bias mode.
    """
    tensors: dict[str, Tensor] = {}
    for name, layer in lora_layers(model).items():
        for suffix, param in layer.adapter_tensors().items():
            tensors[f"{name}.{suffix}"] = param
    for name in state.modules_to_save:
        for key, tensor in module_tensors(model.get_submodule(name)).items():
            tensors[f"{name}.{key}"] = tensor
    tensors.update(_bias_tensors(model, state.config.bias, state.targets, state.modules_to_save))
    return tensors


def _factor_shapes(module: nn.Module, rank: int, dora: bool) -> dict[str, tuple[int, ...]]:
    """Shapes of A, B (and DoRA's magnitude) that a wrapper of `module` would have."""
    shapes: dict[str, tuple[int, ...]]
    if isinstance(module, nn.Embedding):
        shapes = {
            "lora_embedding_A": (rank, module.num_embeddings),
            "lora_embedding_B": (module.embedding_dim, rank),
        }
        magnitude: tuple[int, ...] = (module.embedding_dim,)
    elif isinstance(module, nn.Conv2d):
        kernel_h, kernel_w = module.kernel_size
        shapes = {
            "lora_A.weight": (rank, module.in_channels, kernel_h, kernel_w),
            "lora_B.weight": (module.out_channels, rank, 1, 1),
        }
        magnitude = (1, module.out_channels, 1, 1)  # PEFT's layout
    else:
        assert isinstance(module, nn.Linear)
        shapes = {
            "lora_A.weight": (rank, module.in_features),
            "lora_B.weight": (module.out_features, rank),
        }
        magnitude = (module.out_features,)
    if dora:
        shapes["lora_magnitude_vector"] = magnitude
    return shapes


def expected_shapes(
    model: nn.Module, config: LoRAConfig, resolved: ResolvedTargets
) -> dict[str, Size | tuple[int, ...]]:
    """Keys and shapes of the adapter `config` would put on `model` (nothing is changed).

    Args:
        model: The model, with or without a current adapter.
        config: The incoming adapter's config.
        resolved: `resolve_targets(model, config)`.

    Returns:
        PEFT key (without prefix) -> shape.
    """
    lookup = dict(base_named_modules(model))
    shapes: dict[str, Size | tuple[int, ...]] = {}
    for name in resolved.targets:
        for suffix, shape in _factor_shapes(lookup[name], config.rank, config.use_dora).items():
            shapes[f"{name}.{suffix}"] = shape
    for name in resolved.modules_to_save:
        for key, tensor in module_tensors(lookup[name]).items():
            shapes[f"{name}.{key}"] = tensor.shape
    bias = _bias_tensors(model, config.bias, resolved.targets, resolved.modules_to_save)
    shapes.update({key: tensor.shape for key, tensor in bias.items()})
    return shapes


def canonical_keys(tensors: dict[str, Tensor], saved: tuple[str, ...]) -> dict[str, Tensor]:
    """Fold PEFT's wrapper-internal names for `modules_to_save` into plain module keys.

    With bias="all", PEFT also writes `<m>.modules_to_save.bias` (a duplicate of `<m>.bias`)
    and `<m>.original_module.bias` (the untouched original it keeps but never runs) for a saved
    module `<m>`. The first is an alias; the second has no counterpart here and is dropped.
    """
    result: dict[str, Tensor] = {}
    aliases: dict[str, Tensor] = {}
    for key, tensor in tensors.items():
        owner = next((m for m in saved if key.startswith(m + ".")), None)
        rest = key[len(owner) + 1 :] if owner is not None else ""
        if owner is not None and rest.startswith("original_module."):
            continue
        if owner is not None and rest.startswith("modules_to_save."):
            aliases[f"{owner}.{rest[len('modules_to_save.') :]}"] = tensor
            continue
        result[key] = tensor
    for key, tensor in aliases.items():
        result.setdefault(key, tensor)
    return result
