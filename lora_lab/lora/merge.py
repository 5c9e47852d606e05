"""Merge, unmerge and unload adapters: always explicit, never triggered by train()/eval().

Merging computes ΔW in fp32 and casts the sum back to the weight's dtype. Each merged layer keeps
its pre-merge weight tensor so `unmerge_lora` restores it bit for bit; that costs one extra copy
of every adapted weight while merged. `unload_lora` keeps no copy.
"""

from __future__ import annotations

import torch
from torch import nn

from lora_lab.lora.inject import STATE_ATTR, lora_layers, set_submodule
from lora_lab.lora.layers import LoRALayer


def _layers_or_raise(model: nn.Module, action: str) -> dict[str, LoRALayer]:
    layers = lora_layers(model)
    if not layers:
        raise ValueError(f"cannot {action}: the model has no LoRA layers")
    return layers


def _check_untied(layers: dict[str, LoRALayer]) -> None:
    """Refuse merging when two adapted layers share one weight (merging would add both ΔW)."""
    owners: dict[int, str] = {}
    for name, layer in layers.items():
        key = id(layer.base_layer.weight)
        if key in owners:
            raise ValueError(
                f"layers {owners[key]!r} and {name!r} share one weight; merging both adapters "
                "into it would be wrong"
            )
        owners[key] = name


def lora_delta_weight(layer: LoRALayer) -> torch.Tensor:
    """ΔW of one LoRA layer: what it adds to the pretrained weight, in fp32.

    B·A·scaling for LoRA; for PiSSA (B·A − B₀·A₀)·scaling, as the base weight holds the
    residual W − B₀·A₀·scaling; for DoRA m/‖W + s·B·A‖ · (W + s·B·A) − W.

    Args:
        layer: A LoRA wrapper, merged or not.

    Returns:
        A tensor shaped like `layer.base_layer.weight`: [out, in] for Linear, [out, in, kh, kw]
        for Conv2d, [num_embeddings, embedding_dim] for Embedding. Differentiable; call
        `.detach()` for analysis.
    """
    return layer.effective_delta_weight()


def merge_lora(model: nn.Module) -> None:
    """Merge every adapter into its base weight (DoRA: rescaled rows). Idempotent.

    Raises:
        ValueError: If the model has no LoRA layers, or two adapted layers share a weight.
    """
    layers = _layers_or_raise(model, "merge")
    _check_untied(layers)
    for layer in layers.values():
        layer.merge()


def unmerge_lora(model: nn.Module) -> None:
    """Restore every merged layer's exact pre-merge weight. Idempotent.

    Raises:
        ValueError: If the model has no LoRA layers.
    """
    for layer in _layers_or_raise(model, "unmerge").values():
        layer.unmerge()


def is_merged(model: nn.Module) -> bool:
    """True if any LoRA layer of `model` is merged (False without LoRA layers)."""
    return any(layer.merged for layer in lora_layers(model).values())


def unload_lora(model: nn.Module) -> nn.Module:
    """Replace each LoRA wrapper by its base layer carrying W + ΔW.

    The result holds plain nn.Linear / nn.Conv2d / nn.Embedding layers and no saved copies, and
    no longer carries the adapter config. Base parameters keep requires_grad=False.

    Args:
        model: A model with LoRA layers, merged or not.

    Returns:
        The same model object, changed in place.

    Raises:
        ValueError: If the model has no LoRA layers, or two adapted layers share a weight.
    """
    layers = _layers_or_raise(model, "unload")
    _check_untied(layers)
    for name, layer in layers.items():
        set_submodule(model, name, layer.merged_base_layer())
    if hasattr(model, STATE_ATTR):
        delattr(model, STATE_ATTR)
    return model
