"""Optimizer parameter groups, with LoRA+ learning rates (Hayou et al. 2024) on request.

`lora_parameter_groups` mirrors the grouping of PEFT's `peft.optimizers.create_loraplus_optimizer`
parameter for parameter, so a lora_lab run and a PEFT run put the same tensors at the same
learning rates:

- the A and B of an Embedding adapter: `loraplus_lr_embedding` (PEFT's default 1e-6);
- every other B factor (`lora_B`): `lr × loraplus_lr_ratio`;
- every other trainable 1-D tensor: `lr × loraplus_lr_ratio` too, because PEFT sends anything
  with `ndim == 1` to its B groups. That is DoRA's magnitude on Linear ([out]) and Embedding
  ([dim]) layers, and trainable biases and 1-D `modules_to_save` tensors;
- everything else at `lr`: A factors, `modules_to_save` weights, and DoRA's Conv2d magnitude,
  which PEFT stores as [1, out, 1, 1] (not 1-D, and not named lora_B).

Groups carry only `params`, `lr` and a `name`; weight decay stays the optimizer's own setting.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

from torch import nn

from lora_lab.lora.embedding import LoRAEmbedding
from lora_lab.lora.inject import adapter_state, lora_layers, lora_parameters

# PEFT's default learning rate for embedding adapters under LoRA+ (`loraplus_lr_embedding`).
LORAPLUS_LR_EMBEDDING = 1e-6


def _positive(value: object, name: str) -> float:
    if (
        not isinstance(value, numbers.Real)
        or isinstance(value, bool)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def _trainable(model: nn.Module) -> list[nn.Parameter]:
    """The adapter's parameters if the model has one, else every parameter that requires grad."""
    if adapter_state(model) is not None:
        return lora_parameters(model)
    return [p for p in model.parameters() if p.requires_grad]


def _roles(model: nn.Module) -> dict[int, str]:
    """id(param) -> "embedding" | "B" for the adapter tensors whose role is not set by shape."""
    roles: dict[int, str] = {}
    for layer in lora_layers(model).values():
        for key, param in layer.adapter_tensors().items():
            if isinstance(layer, LoRAEmbedding) and key.startswith("lora_embedding_"):
                roles[id(param)] = "embedding"
            elif key.startswith("lora_B"):
                roles[id(param)] = "B"
    return roles


def lora_parameter_groups(
    model: nn.Module,
    lr: float,
    loraplus_lr_ratio: float | None = None,
    *,
    loraplus_lr_embedding: float = LORAPLUS_LR_EMBEDDING,
) -> list[dict[str, Any]]:
    """Optimizer parameter groups for the trainable parameters of `model`.

    Without a ratio: one group holding every trainable parameter (the adapter's, as
    `lora_parameters` gives them, or every parameter with requires_grad if the model has no
    adapter) at `lr`. With a ratio: PEFT's LoRA+ grouping (module docstring), empty groups left
    out, each group named "lora_A", "lora_B" or "embedding".

    Args:
        model: A model from `inject_lora` / `load_adapter` (or any module).
        lr: The base learning rate (A factors and the rest); a finite number > 0.
        loraplus_lr_ratio: ηB/ηA of LoRA+, a finite number > 0 (the paper uses ≥ 1), or None.
        loraplus_lr_embedding: Learning rate of Embedding adapters under LoRA+ (PEFT's
            default 1e-6); ignored without a ratio.

    Returns:
        A list of dicts with keys "params", "lr" and "name", for `torch.optim` constructors.

    Raises:
        ValueError: If `lr`, `loraplus_lr_ratio` or `loraplus_lr_embedding` is not a finite
            number > 0 (the message names it), or the model has no trainable parameters.
    """
    lr = _positive(lr, "lr")
    params = _trainable(model)
    if not params:
        raise ValueError("the model has no trainable parameters")
    if loraplus_lr_ratio is None:
        return [{"params": params, "lr": lr, "name": "trainable"}]
    ratio = _positive(loraplus_lr_ratio, "loraplus_lr_ratio")
    embedding_lr = _positive(loraplus_lr_embedding, "loraplus_lr_embedding")
    roles = _roles(model)
    groups: dict[str, list[nn.Parameter]] = {"lora_A": [], "embedding": [], "lora_B": []}
    for param in params:
        role = roles.get(id(param))
        if role == "embedding":
            groups["embedding"].append(param)
        elif role == "B" or param.ndim == 1:
            groups["lora_B"].append(param)
        else:
            groups["lora_A"].append(param)
    rates = {"lora_A": lr, "embedding": embedding_lr, "lora_B": lr * ratio}
    return [
        {"params": members, "lr": rates[name], "name": name}
        for name, members in groups.items()
        if members
    ]
