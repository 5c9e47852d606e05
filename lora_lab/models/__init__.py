"""Networks (plain nn.Modules) and the LightningModules that train them."""

from lora_lab.models.module import (
    ClassifierModule,
    LoRAClassifierModule,
    LoRARegressionModule,
    RegressionModule,
    TaskModule,
    lora_variant,
)
from lora_lab.models.networks import MLP, ConvNet, LinearMap
from lora_lab.models.weights import (
    WeightsError,
    load_network_weights,
    read_weights,
    save_network_weights,
)

__all__ = [
    "MLP",
    "ClassifierModule",
    "ConvNet",
    "LinearMap",
    "LoRAClassifierModule",
    "LoRARegressionModule",
    "RegressionModule",
    "TaskModule",
    "WeightsError",
    "load_network_weights",
    "lora_variant",
    "read_weights",
    "save_network_weights",
]
