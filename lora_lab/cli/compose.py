"""The config composed as `hydra.main` will compose it: the same search path (the packaged
or checked-out configs, and the user's `--config-dir`), with Hydra's errors as one line."""

from __future__ import annotations

import argparse
import contextlib
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from lora_lab.cli.errors import UsageError, one_line
from lora_lab.config_path import CONFIG_NAME, config_search_path

if TYPE_CHECKING:
    from omegaconf import DictConfig


def hydra_args(args: Sequence[str]) -> argparse.Namespace:
    """Hydra's own reading of the command line (`--cfg job` and `--cfg=job` alike)."""
    from hydra._internal.utils import get_args_parser

    return get_args_parser().parse_args(list(args))


@contextlib.contextmanager
def initialized(search_path: str, user_dir: str | None) -> Iterator[None]:
    """Hydra initialised as `hydra.main` initialises it: the primary config location (a folder,
    or `pkg://lora_lab.conf`), and the user's `--config-dir` folder before the structured
    configs, so that both compositions see the same files.

    Raises:
        UsageError: `user_dir` (`--config-dir`) is not a folder.
    """
    from hydra import version
    from hydra._internal.hydra import Hydra
    from hydra._internal.utils import create_config_search_path
    from hydra.core.config_search_path import SearchPathQuery
    from hydra.initialize import get_gh_backup, restore_gh_from_backup

    search = create_config_search_path(search_path)
    if user_dir is not None:
        folder = os.path.abspath(user_dir)  # as hydra.main takes it
        if not os.path.isdir(folder):
            raise UsageError(f"--config-dir {user_dir!r} is not a folder")
        search.prepend(
            provider="command-line",
            path=f"file://{folder}",
            anchor=SearchPathQuery(provider="schema"),
        )
    backup = get_gh_backup()
    try:
        version.setbase("1.3")
        Hydra.create_main_hydra2(task_name="app", config_search_path=search)
        yield
    finally:
        restore_gh_from_backup(backup)


def compose_config(parsed: argparse.Namespace) -> DictConfig:
    """Compose the config as Hydra will, turning its errors into one line."""
    from hydra import compose
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    search_path = (
        str(Path(parsed.config_path).resolve()) if parsed.config_path else config_search_path()
    )
    try:
        with initialized(search_path, parsed.config_dir):
            cfg = compose(
                config_name=parsed.config_name or CONFIG_NAME, overrides=list(parsed.overrides)
            )
        OmegaConf.to_container(cfg, resolve=True)
    except (HydraException, OmegaConfBaseException) as error:
        message = one_line(error).split(" Available options")[0].split(" Config search path")[0]
        options = str(error).split("Available options in")
        if len(options) > 1:  # e.g. data=nosuch: name the choices on the same line
            lines = options[1].splitlines()[1:]
            choices = []
            for line in lines:
                if not line.strip() or "Config search path" in line:
                    break
                choices.append(line.strip())
            message += f" (choices: {', '.join(choices)})"
        raise UsageError(message) from None
    return cfg
