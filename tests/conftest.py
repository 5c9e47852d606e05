"""Every test composes lora_lab's configs as the command line does: with the schema of our own
nodes in Hydra's ConfigStore (conf/config.yaml's defaults list names it)."""

from lora_lab.pipeline.schema import register_schema

register_schema()
