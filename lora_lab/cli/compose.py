"""The config composed as `hydra.main` will compose it: the same search path (the packaged
or checked-out configs, and the user's `--config-dir`), and the same schema of our own nodes
(`pipeline.schema`). An override Hydra refuses is set aside and the rest composed again, so
that every bad override is found in one go."""

from __future__ import annotations

import argparse
import contextlib
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lora_lab.cli.errors import UsageError, one_line
from lora_lab.config_path import CONFIG_NAME, config_search_path

if TYPE_CHECKING:
    from hydra.core.override_parser.types import Override
    from omegaconf import DictConfig

    from lora_lab.pipeline.schema import Problem


def hydra_args(args: Sequence[str]) -> argparse.Namespace:
    """Hydra's own reading of the command line (`--cfg job` and `--cfg=job` alike)."""
    # Private: Hydra has no public API for its command-line parser, which `hydra.main` uses.
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
    # Private: the public `initialize_config_dir`/`initialize_config_module` take one of a
    # folder or a module, and no `--config-dir`; `hydra.searchpath` would put the user's
    # folder after ours, where `--config-dir` puts it before.
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


def parse_overrides(overrides: Sequence[str]) -> list[Override]:
    """Hydra's overrides as it parses them (one line on a syntax error)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        return OverridesParser.create().parse_overrides(list(overrides))
    except HydraException as error:
        raise UsageError(one_line(error)) from None


def typed_values(overrides: Sequence[str]) -> dict[str, Any]:
    """Each `key=value` override's value as typed (a sweep's `a,b` left out)."""
    return {
        o.key_or_group: o.value()
        for o in parse_overrides(overrides)
        if not o.is_delete() and not o.is_sweep_override() and "/" not in o.key_or_group
    }


def compose_config(parsed: argparse.Namespace) -> tuple[DictConfig, list[Problem]]:
    """Compose the config as Hydra will, without the overrides Hydra refuses.

    Returns:
        The config, and one problem per override refused (a bad type, an unknown key, an
        option of a config group that is not there).

    Raises:
        ConfigError: the problems found so far, where Hydra refuses the config itself (a
            file of it) rather than an override.
    """
    from hydra import compose
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from lora_lab.pipeline.schema import ConfigError, register_schema

    register_schema()
    search_path = (
        str(Path(parsed.config_path).resolve()) if parsed.config_path else config_search_path()
    )
    overrides = parse_overrides(parsed.overrides)
    refused: list[tuple[Override | None, Exception]] = []
    while True:
        try:
            with initialized(search_path, parsed.config_dir):
                cfg = compose(
                    config_name=parsed.config_name or CONFIG_NAME,
                    overrides=[o.input_line for o in overrides],
                )
            OmegaConf.to_container(cfg, resolve=True)
        except (HydraException, OmegaConfBaseException) as error:
            culprit = _culprit(error, overrides)
            refused.append((culprit, error))
            if culprit is None:
                raise ConfigError([_problem(o, e, None) for o, e in refused]) from None
            overrides.remove(culprit)
            continue
        return cfg, [_problem(o, e, cfg) for o, e in refused]


def _cause(error: BaseException) -> Any:
    """The OmegaConf error under Hydra's, which names the key (`full_key`)."""
    from omegaconf.errors import OmegaConfBaseException

    while error is not None and not isinstance(error, OmegaConfBaseException):
        error = error.__cause__ or error.__context__  # type: ignore[assignment]
    return error


def _culprit(error: Exception, overrides: list[Override]) -> Override | None:
    """The override Hydra refused with `error`; None where it refused a config file."""
    from hydra.errors import MissingConfigException

    if isinstance(error, MissingConfigException):
        group, _, name = str(error.missing_cfg_file).rpartition("/")
        matches = [o for o in overrides if o.key_or_group == group and o.value() == name]
    else:
        key = str(getattr(_cause(error), "full_key", "") or "").split("[")[0]
        matches = [o for o in overrides if key and (key + ".").startswith(o.key_or_group + ".")]
    return matches[-1] if matches else None


def _problem(override: Override | None, error: Exception, cfg: DictConfig | None) -> Problem:
    """An override Hydra refused, as a problem: its key, its value and why."""
    from hydra.errors import MissingConfigException
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, ValidationError

    from lora_lab.pipeline.config_check import allowed_for, known_keys, no_such_key
    from lora_lab.pipeline.schema import NO_VALUE, Problem

    cause = _cause(error)
    key = str(getattr(cause, "full_key", "") or "").split("[")[0]
    value = override.value() if override is not None else getattr(cause, "value", NO_VALUE)
    if isinstance(error, MissingConfigException) and error.options:
        group = str(error.missing_cfg_file).rpartition("/")[0]
        choices = ", ".join(error.options)
        return Problem(group, value, f"is not allowed: it must be one of {choices}")
    if isinstance(cause, (ConfigAttributeError, ConfigKeyError)) and key:
        parent = key.rpartition(".")[0]
        return no_such_key(key, known_keys(cfg, parent))
    allowed = allowed_for(key) if isinstance(cause, ValidationError) else None
    if allowed is not None:
        return Problem(key, value, f"is not allowed: it must be {allowed}")
    # Hydra's own words, for what the schema cannot name (a config file of the user's, …)
    return Problem(key or "config", NO_VALUE, one_line(error))
