# Makes conf/ the package lora_lab.conf once installed, for importlib.resources and pkg://.
