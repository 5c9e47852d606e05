"""Side venvs: packages lora_lab is tested with that must stay off its import path.

- **HF PEFT** (`<venv>/interop`) pulls in transformers, and torchmetrics — so every Lightning
  import — loads transformers whenever it can be imported: about 1.3 s more on every
  `lora-lab` command. lora_lab never imports PEFT (adapters are written in PEFT's format with
  safetensors).
- **hydra-ray-launcher** (`<venv>/ray`) pins `cloudpickle<3`, while joblib (the joblib
  launcher) needs `cloudpickle>=3`: the two cannot share one environment. It has a venv of its
  own, apart from PEFT's too: a process that imports PEFT from its venv must not also find the
  Ray plugin, which Hydra would then load into every config (and into the pickles it hands to
  other launchers' workers).

`make setup` creates both; each has a `.pth` file that adds the main venv's site-packages after
its own, so it runs lora_lab with everything the main venv has, its own versions first. The
PEFT interop tests and `bench/lora_layers.py` import PEFT from its venv (`import_peft`); the Ray
launcher tests run `lora-lab` with the Ray venv's Python (`side_python("ray")`).
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path
from types import ModuleType

SIDE_VENVS_ENV = "LORA_LAB_SIDE_VENVS"


def side_venv(name: str) -> Path:
    """A side venv: `$LORA_LAB_SIDE_VENVS/<name>` if that is set, else `<name>/` inside the
    running venv (`make setup` creates `interop` and `ray`)."""
    return Path(os.environ.get(SIDE_VENVS_ENV) or sys.prefix) / name


def side_python(name: str) -> Path:
    """The Python of side venv `name`.

    Raises:
        FileNotFoundError: There is no such venv; the message says where it was looked for.
    """
    python = side_venv(name) / "bin" / "python"
    if not python.is_file():
        raise FileNotFoundError(
            f"no side venv {name!r} at {side_venv(name)} (`make setup` creates it; "
            f"or set {SIDE_VENVS_ENV} to the folder holding it)"
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
    root = side_venv("interop")
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
