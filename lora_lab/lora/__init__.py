"""Plain-PyTorch LoRA for any `nn.Module`: layers, injection, merging, PEFT-format I/O, counts.

Typical use::

    config = LoRAConfig(rank=8, alpha=16, target_modules="all-linear", modules_to_save=["head"])
    inject_lora(model, config)                 # wraps layers in place, freezes the rest
    optimizer = torch.optim.Adam(lora_parameter_groups(model, lr=1e-3, loraplus_lr_ratio=16))
    ...
    save_adapter(model, "adapters/rank8")      # loads in peft.PeftModel.from_pretrained too
    unload_lora(model)                         # plain layers with merged weights

Methods: `LoRAConfig(use_dora=True)` builds DoRA layers (`lora_lab.lora.dora`),
`LoRAConfig(init="pissa")` PiSSA layers (`lora_lab.lora.pissa`); LoRA+ is an optimizer setting,
`lora_parameter_groups(..., loraplus_lr_ratio=...)` (`lora_lab.lora.loraplus`).

The names below load on first use (PEP 562 `__getattr__`): `import lora_lab.lora.config`
runs this file first, and `LoRAConfig` needs no torch, so the command line checks `lora.*`
values before torch is imported.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lora_lab.lora.adapter_io import load_adapter, save_adapter
    from lora_lab.lora.config import LoRAConfig
    from lora_lab.lora.dora import DoRAConv2d, DoRAEmbedding, DoRALinear
    from lora_lab.lora.embedding import LoRAEmbedding
    from lora_lab.lora.inject import inject_lora, lora_config, lora_layers, lora_parameters
    from lora_lab.lora.layers import LoRAConv2d, LoRALayer, LoRALinear
    from lora_lab.lora.loraplus import lora_parameter_groups
    from lora_lab.lora.merge import (
        is_merged,
        lora_delta_weight,
        merge_lora,
        unload_lora,
        unmerge_lora,
    )
    from lora_lab.lora.params import count_parameters, parameter_summary
    from lora_lab.lora.pissa import PiSSALinear

# Each exported name → the module of this package that defines it.
_HOME = {
    "DoRAConv2d": "dora",
    "DoRAEmbedding": "dora",
    "DoRALinear": "dora",
    "LoRAConfig": "config",
    "LoRAConv2d": "layers",
    "LoRAEmbedding": "embedding",
    "LoRALayer": "layers",
    "LoRALinear": "layers",
    "PiSSALinear": "pissa",
    "count_parameters": "params",
    "inject_lora": "inject",
    "is_merged": "merge",
    "load_adapter": "adapter_io",
    "lora_config": "inject",
    "lora_delta_weight": "merge",
    "lora_layers": "inject",
    "lora_parameter_groups": "loraplus",
    "lora_parameters": "inject",
    "merge_lora": "merge",
    "parameter_summary": "params",
    "save_adapter": "adapter_io",
    "unload_lora": "merge",
    "unmerge_lora": "merge",
}

__all__ = [
    "DoRAConv2d",
    "DoRAEmbedding",
    "DoRALinear",
    "LoRAConfig",
    "LoRAConv2d",
    "LoRAEmbedding",
    "LoRALayer",
    "LoRALinear",
    "PiSSALinear",
    "count_parameters",
    "inject_lora",
    "is_merged",
    "load_adapter",
    "lora_config",
    "lora_delta_weight",
    "lora_layers",
    "lora_parameter_groups",
    "lora_parameters",
    "merge_lora",
    "parameter_summary",
    "save_adapter",
    "unload_lora",
    "unmerge_lora",
]


def __getattr__(name: str) -> Any:
    """Import an exported name's module on first use, and keep the name here."""
    home = _HOME.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{home}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
