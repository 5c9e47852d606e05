"""`python -m lora_lab.cli`: the console script."""

from lora_lab.cli import run

run()
