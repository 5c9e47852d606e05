"""lora_lab: LoRA fine-tuning studies.

`lora_lab.lora` is a plain-PyTorch LoRA library for any `nn.Module`; the other subpackages
(data, models, pipeline, analysis, report) build the Lightning + Hydra study on top of it.
"""

__version__ = "0.1.0"
