"""The interop venv: packages lora_lab is tested with but that must stay off its import path.

- **HF PEFT** pulls in transformers, and torchmetrics — so every Lightning import — loads
  transformers whenever it can be imported: about 1.3 s more on every `lora-lab` command.
  lora_lab never imports PEFT (adapters are written in PEFT's format with safetensors).
- **hydra-ray-launcher** pins `cloudpickle<3`, while joblib (the joblib launcher) needs
  `cloudpickle>=3`: the two cannot share one environment.

So `make setup` installs them into a venv of their own, `<venv>/interop`, whose `.pth` file
adds the main venv's site-packages after its own: it runs lora_lab with everything the main
venv has, its own versions first. The PEFT interop tests and `bench/lora_layers.py` import PEFT
from it (`import_peft`); the Ray launcher tests run `lora-lab` with its Python
(`interop_python`).
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


def interop_python() -> Path:
    """The interop venv's Python.

    Raises:
        FileNotFoundError: There is no interop venv; the message says where it was looked for.
    """
    python = interop_root() / "bin" / "python"
    if not python.is_file():
        raise FileNotFoundError(
            f"no interop venv at {interop_root()} (`make setup` creates it; or set {INTEROP_ENV})"
        )
    return python


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
    # Appended, not prepended: this environment's packages keep precedence (PEFT's own
    # requirements were resolved against them).
    if str(sites[0]) not in sys.path:
        sys.path.append(str(sites[0]))
    return importlib.import_module("peft")
