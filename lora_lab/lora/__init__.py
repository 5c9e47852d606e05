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
"""

from lora_lab.lora.adapter_io import load_adapter, save_adapter
from lora_lab.lora.config import LoRAConfig
from lora_lab.lora.dora import DoRAConv2d, DoRAEmbedding, DoRALinear
from lora_lab.lora.embedding import LoRAEmbedding
from lora_lab.lora.inject import inject_lora, lora_config, lora_layers, lora_parameters
from lora_lab.lora.layers import LoRAConv2d, LoRALayer, LoRALinear
from lora_lab.lora.loraplus import lora_parameter_groups
from lora_lab.lora.merge import is_merged, lora_delta_weight, merge_lora, unload_lora, unmerge_lora
from lora_lab.lora.params import count_parameters, parameter_summary
from lora_lab.lora.pissa import PiSSALinear

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
