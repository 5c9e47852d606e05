"""Where the Hydra configs live: the one definition the CLI, the pipeline and the tests use.

`conf/` sits at the top of the repository, and pyproject.toml maps it into the package as
`lora_lab.conf` when a wheel is built, so an installed lora_lab finds its configs through
Hydra's package search path (`pkg://lora_lab.conf`) from any folder. A lora_lab imported from a
source checkout (an editable install, or the checkout on PYTHONPATH) reads that checkout's own
`conf/` instead: an editable install maps `lora_lab.conf` to the checkout it was installed
from, which is not the one imported when a second worktree is put first on PYTHONPATH.

Only the standard library is imported here, so `lora-lab --help` stays fast.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

CONFIG_PACKAGE = "lora_lab.conf"
CONFIG_NAME = "config"
PACKAGE_SCHEME = "pkg://"
# The folder above the package: a source checkout's root, or site-packages in an install.
_ROOT = Path(__file__).resolve().parent.parent


class ConfigsNotFound(FileNotFoundError):
    """lora_lab's configs are neither in its source checkout nor installed with it."""


def _checkout_conf() -> Path | None:
    """The `conf/` of the source checkout this lora_lab is imported from; None if installed."""
    conf = _ROOT / "conf"
    if (_ROOT / "pyproject.toml").is_file() and (conf / f"{CONFIG_NAME}.yaml").is_file():
        return conf
    return None


def config_dir() -> Path:
    """The folder of lora_lab's configs on disk (`conf/`), for code that reads its files.

    Returns:
        The checkout's `conf/`, or the installed package `lora_lab.conf`'s folder.

    Raises:
        ConfigsNotFound: an install without `lora_lab.conf` (built without pyproject's mapping).
    """
    checkout = _checkout_conf()
    if checkout is not None:
        return checkout
    try:
        return Path(str(files(CONFIG_PACKAGE)))
    except ModuleNotFoundError:
        raise ConfigsNotFound(
            f"lora_lab's configs ({CONFIG_PACKAGE}) are not installed beside {_ROOT / 'lora_lab'};"
            " reinstall lora_lab from its repository (pip install .)"
        ) from None


def config_search_path() -> str:
    """The primary config location as Hydra takes it (`hydra.main(config_path=...)`).

    Returns:
        The checkout's `conf/` as an absolute path, or `pkg://lora_lab.conf` when installed.
    """
    checkout = _checkout_conf()
    return str(checkout) if checkout is not None else PACKAGE_SCHEME + CONFIG_PACKAGE
