"""Finding HF PEFT for the interop checks without putting it on every command's import path.

PEFT pulls in transformers, and torchmetrics — so every Lightning import — loads transformers
whenever it can be imported: about 1.3 s more on every `lora-lab` command. lora_lab itself
never imports PEFT (adapters are written in PEFT's format with safetensors), so `make setup`
installs it into a venv of its own, `<venv>/interop`, which sees the main venv's packages
through a `.pth` file. Only the PEFT interop tests and `bench/lora_layers.py` look there.
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path
from types import ModuleType

INTEROP_ENV = "LORA_LAB_INTEROP"


def interop_root() -> Path:
    """The interop venv: `$LORA_LAB_INTEROP`, else `interop/` inside the running venv."""
    return Path(os.environ.get(INTEROP_ENV) or Path(sys.prefix) / "interop")


def import_peft() -> ModuleType:
    """Import `peft`: from this environment if it has it, else from the interop venv.

    Raises:
        ModuleNotFoundError: Neither has it; the message says where it was looked for.
    """
    try:
        return importlib.import_module("peft")
    except ModuleNotFoundError:
        pass
    root = interop_root()
    sites = sorted(root.glob("lib/python*/site-packages"))
    if not sites:
        raise ModuleNotFoundError(
            f"peft is neither installed here nor in the interop venv {root}; "
            f"`make setup` puts it there (or: pip install 'lora_lab[interop]')"
        )
    # Appended, not prepended: the main venv's packages keep precedence, as when pip resolved
    # PEFT's requirements against them.
    if str(sites[0]) not in sys.path:
        sys.path.append(str(sites[0]))
    return importlib.import_module("peft")
