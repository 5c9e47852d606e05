"""`lora-lab`: the command line. `sweep` and `train` are Hydra apps; `report` and `analyze`
take a study folder.

Bad input ends in one line on stderr and exit code 2; `--debug` (or LORA_LAB_DEBUG=1) shows
the full traceback instead.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shlex
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from lora_lab.config_path import CONFIG_NAME, config_dir, config_search_path

if TYPE_CHECKING:
    from omegaconf import DictConfig

USAGE = """\
usage: lora-lab <command> [hydra overrides…] [--debug]

commands:
  sweep    the whole study: pretrain → full finetune → LoRA at every rank → results, plots, report
  train    one stage: stage=pretrain|full_finetune|lora (Hydra multirun with -m)
  report   DIR | TABLE.csv [report.tolerance=0.01]: results.csv, the plots and report.md, rebuilt
           from the finished runs under DIR, or from a results table alone (a .csv file, or a
           folder holding only results.csv: a merged or filtered table), written beside it.
           A table needs the columns run_id, stage, rank, alpha, seed, learning_rate,
           trainable_params, test_acc, test_loss, status (val_acc to choose learning rates).
  analyze  DIR: weight-update spectra and subspace similarity (LoRA paper §7) → analysis.csv

examples:
  lora-lab sweep                                   # default study: Fashion-MNIST, ranks 1…64
  lora-lab sweep sweep.ranks=[1,4,16] trainer.max_epochs=3 output_dir=outputs/quick
  lora-lab sweep experiment=fashion_mnist_task_shift sweep.seeds=[0,1,2]
  lora-lab sweep data=cifar10 model=convnet data.root=~/data   # CIFAR-10 files on disk
  lora-lab sweep sweep.learning_rates=[3e-4,1e-3]  # ranks × lrs, fused in one pass (the default)
  lora-lab sweep sweep.fused=false                 # every LoRA run under its own Trainer
  lora-lab sweep sweep.jobs=2 sweep.alphas=[1,16]  # 2 runs at a time; a rank × alpha grid
  lora-lab sweep trainer=ddp trainer.devices=2     # each run data-parallel on 2 devices
  lora-lab train stage=pretrain output_dir=outputs/base
  lora-lab train -m stage=lora lora.rank=1,2,4,8 pretrain_ckpt=outputs/base/checkpoints/pretrain.safetensors
  lora-lab train -m hydra/launcher=joblib hydra.launcher.n_jobs=2 stage=lora lora.rank=1,2,4,8 pretrain_ckpt=…
  lora-lab report outputs/<study>
  lora-lab analyze outputs/<study>

Any config value can be overridden (see conf/ and `lora-lab sweep --cfg job`). Precedence: a
stage's own setting (stages.<stage>.max_epochs|lr|classes, stages.<stage>.data|module|trainer)
wins over trainer.*, module.* and data.* for that stage; experiments use stages.* only where
stages differ, so trainer.max_epochs=1 reaches every stage, and a shadowed command-line value is
named in one line. Bad values end in one line and exit code 2, before anything is written.
`--debug` or LORA_LAB_DEBUG=1 shows full tracebacks.
"""

# lora_lab's configs on disk (lora_lab.config_path decides where).
CONF_DIR = config_dir()


class UsageError(ValueError):
    """Bad command-line input."""


def _fail(message: str, code: int = 2) -> int:
    print(f"lora-lab: error: {message}", file=sys.stderr)
    return code


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text or type(error).__name__


def _user_cause(error: BaseException) -> BaseException | None:
    """The bad-input error (a ValueError) an exception was raised from, if any."""
    cause = error.__cause__ or error.__context__
    while cause is not None:
        if isinstance(cause, ValueError):
            return cause
        cause = cause.__cause__ or cause.__context__
    return None


def _guard(func: Callable[[], int | None], debug: bool) -> int:
    """Run `func`; bad input → one line + exit 2, a crash → one line + exit 1."""
    from omegaconf.errors import OmegaConfBaseException

    if debug:
        return func() or 0
    try:
        return func() or 0
    except (ValueError, OmegaConfBaseException, FileNotFoundError, PermissionError) as error:
        return _fail(_one_line(error))
    except Exception as error:
        cause = _user_cause(error)
        if cause is not None:  # e.g. Hydra's InstantiationException around a DataError
            return _fail(_one_line(cause))
        return _fail(
            f"{type(error).__name__}: {_one_line(error)} (run with --debug for the traceback)", 1
        )
    except KeyboardInterrupt:
        return _fail("interrupted", 130)


def _hydra_args(args: Sequence[str]) -> argparse.Namespace:
    """Hydra's own reading of the command line (`--cfg job` and `--cfg=job` alike)."""
    from hydra._internal.utils import get_args_parser

    return get_args_parser().parse_args(list(args))


@contextlib.contextmanager
def _initialized(search_path: str, user_dir: str | None) -> Iterator[None]:
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


def _compose(parsed: argparse.Namespace) -> DictConfig:
    """Compose the config as Hydra will, turning its errors into one line."""
    from hydra import compose
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    search_path = (
        str(Path(parsed.config_path).resolve()) if parsed.config_path else config_search_path()
    )
    try:
        with _initialized(search_path, parsed.config_dir):
            cfg = compose(
                config_name=parsed.config_name or CONFIG_NAME, overrides=list(parsed.overrides)
            )
        OmegaConf.to_container(cfg, resolve=True)
    except (HydraException, OmegaConfBaseException) as error:
        message = _one_line(error).split(" Available options")[0].split(" Config search path")[0]
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


@dataclass
class Checked:
    """What the preflight found: the notes to say, and the one job it composed and checked
    (not under `-m`, `--cfg` or `--help`), so that the job is not planned or built again.

    Attributes:
        notes: One line per command-line override that another key shadows.
        cfg: The job's composed config.
        runs: A sweep's plan of `cfg`, every check passed.
        pinned: Overrides for Hydra that keep it to the job checked (`pinned_output_dir`).
    """

    notes: list[str] = field(default_factory=list)
    cfg: DictConfig | None = None
    runs: list[Any] | None = None
    pinned: list[str] = field(default_factory=list)

    def plan_of(self, cfg: DictConfig) -> list[Any] | None:
        """The preflight's plan when `cfg` (Hydra's) has the values it checked, else None."""
        from omegaconf import OmegaConf

        values = OmegaConf.to_container(cfg, resolve=True)
        if self.cfg is None or OmegaConf.to_container(self.cfg, resolve=True) != values:
            return None
        return self.runs


def _preflight(command: str, parsed: argparse.Namespace) -> Checked:
    """Check everything that can be checked before Hydra runs and writes into output_dir:
    the config composes, every key has an allowed value, every stage builds, the data and
    checkpoints are there, and output_dir can take the study. Bad input leaves no new folder
    and an existing one untouched. Under `-m`, every job of the sweep is checked.

    The plain values are checked first, before torch and Lightning are imported, so that a
    bad one is refused at once; then what only built objects can check.

    Returns:
        The notes to say, and the job checked.
    """
    from lora_lab.pipeline.overrides import multirun_jobs, pinned_output_dir, shadowed_overrides

    if any((parsed.cfg, parsed.info, parsed.help, parsed.hydra_help, parsed.shell_completion)):
        if not parsed.multirun:
            _compose(parsed)  # a bad override is one line here too
        return Checked()  # Hydra prints and exits: nothing runs, nothing is written
    if not parsed.multirun:
        cfg = _compose(parsed)
        runs = _check_job(command, cfg, None)
        notes = shadowed_overrides(cfg, parsed.overrides, command)
        return Checked(notes, cfg, runs, pinned_output_dir(cfg, parsed.overrides))
    jobs = multirun_jobs(parsed.overrides)
    # A cluster launcher (submitit, Ray) trains elsewhere: this machine may lack the jobs'
    # accelerator, so their Trainers are built where they run.
    launchers = [
        a.split("=", 1)[1] for a in parsed.overrides if a.lstrip("+~").startswith("hydra/launcher=")
    ]
    local = all(name in ("basic", "joblib") for name in launchers)
    notes: list[str] = []
    for index, job in enumerate(jobs or []):
        cfg = _compose(argparse.Namespace(**{**vars(parsed), "overrides": job}))
        _check_job(command, cfg, Path(str(cfg.output_dir)).expanduser(), build_trainer=local)
        if index == 0:
            notes = shadowed_overrides(cfg, job, command)
    return Checked(notes)


def _check_job(
    command: str, cfg: DictConfig, sweep_dir: Path | None, build_trainer: bool = True
) -> list[Any] | None:
    """The checks of one study (`sweep`) or one stage (`train`); under `-m`, `sweep_dir` is
    the multirun folder that holds each job's folder. Returns a study's plan."""
    from lora_lab.pipeline.config_check import check_values
    from lora_lab.pipeline.plan import plan
    from lora_lab.pipeline.resume import check_output_dir, check_study_dir

    out = Path(str(cfg.output_dir)).expanduser()
    # Plain values first: these modules import no torch, so a bad value is refused at once.
    if command == "sweep":
        runs = plan(cfg)
    else:
        check_values(cfg, stages=(str(cfg.stage),))
    # What only built objects can check: from here on torch and Lightning are imported.
    if command == "sweep":
        from lora_lab.pipeline.preflight import check_study

        check_study(cfg, runs, build_trainer)
    else:
        from lora_lab.pipeline.train import train_preflight

        train_preflight(cfg, build_trainer)
        runs = None
    check_output_dir(sweep_dir or out)
    if command == "sweep" and sweep_dir is None:
        check_study_dir(cfg, out)
    return runs


def _hydra_command(command: str, args: list[str], debug: bool) -> int:
    import hydra
    from hydra.core.hydra_config import HydraConfig

    exit_code = 0
    command_line = shlex.join(["lora-lab", command, *args])
    parent = os.getpid()
    checked = Checked()

    def task(cfg: DictConfig) -> None:
        # Where training starts: torch and Lightning are imported here, not before.
        from lora_lab.pipeline.console import say
        from lora_lab.pipeline.parallel import JobFailed
        from lora_lab.pipeline.sweep import run_sweep
        from lora_lab.pipeline.train import train

        nonlocal exit_code
        study_dir = Path(HydraConfig.get().runtime.output_dir)
        for note in checked.notes:
            say(f"note: {note}")

        def body() -> int:
            if command == "sweep":
                runs = checked.plan_of(cfg)  # None under -m: each job checks itself
                summary = run_sweep(cfg, study_dir, command_line, runs)
                say(f"study written to {study_dir} (results.csv, accuracy_vs_rank.png, report.md)")
                failed = summary["failed"]
                if failed:
                    say(f"{len(failed)} run(s) failed: {', '.join(failed)}", logging.ERROR)
                _say_recommendation(study_dir, float(cfg.report.tolerance))
                return 1 if failed else 0
            result, _ = train(cfg, study_dir)
            say(f"{result.summary()} → {study_dir}")
            return 0

        code = _guard(body, debug)
        exit_code = max(exit_code, code)
        if code and os.getpid() != parent:
            # Launchers that run jobs elsewhere (joblib, submitit, Ray) never see exit_code:
            # fail the job, so that Hydra reports it and the parent exits non-zero.
            raise JobFailed(f"lora-lab {command}: a job exited with code {code} (error above)")

    try:
        parsed = _hydra_args(args)
    except SystemExit as stop:  # argparse has printed the usage and the problem
        return stop.code if isinstance(stop.code, int) else 2

    def preflight() -> int:
        nonlocal checked
        checked = _preflight(command, parsed)
        return 0

    code = _guard(preflight, debug)
    if code:
        return code
    sys.argv = [f"lora-lab {command}", *args, *checked.pinned]
    app = hydra.main(config_path=config_search_path(), config_name=CONFIG_NAME, version_base="1.3")
    try:
        app(task)()
    except SystemExit as stop:  # Hydra exits 1 after printing a failed job's JobFailed
        return max(exit_code, stop.code if isinstance(stop.code, int) else 1)
    return exit_code


def _say_recommendation(study_dir: Path, tolerance: float) -> None:
    """The study's answer, as its last line(s): the recommended rank of each method."""
    from lora_lab.pipeline.console import say
    from lora_lab.report.verdict import recommend
    from lora_lab.results import read_results

    try:
        frame = read_results(study_dir / "results.csv")
    except ValueError:  # no usable table (every run failed): the failures were said above
        return
    for recommendation in recommend(frame, tolerance):
        say(recommendation.sentence(tolerance))


def _study_dir(args: list[str], command: str) -> Path:
    if len(args) != 1:
        raise UsageError(
            f"`lora-lab {command}` takes one study folder, got {len(args)} arguments: lora-lab {command} DIR"
        )
    path = Path(args[0]).expanduser()
    if not path.is_dir():
        raise UsageError(f"study folder {str(path)!r} does not exist")
    return path


def _report_args(args: list[str]) -> tuple[Path, float | None]:
    """`lora-lab report PATH [report.tolerance=V]`: the path and the tolerance (None: the
    study's own, else the default)."""
    tolerance, rest = None, []
    for arg in args:
        if arg.startswith("report.tolerance="):
            value = arg.split("=", 1)[1]
            try:
                tolerance = float(value)
            except ValueError:
                raise UsageError(f"report.tolerance={value!r}: not a number") from None
            if not 0 <= tolerance < 1:
                raise UsageError(f"report.tolerance={value}: must be a number in [0, 1)")
        else:
            rest.append(arg)
    if len(rest) != 1:
        raise UsageError(
            f"`lora-lab report` takes one study folder or results table, got {len(rest)}: "
            "lora-lab report DIR|results.csv [report.tolerance=0.01]"
        )
    path = Path(rest[0]).expanduser()
    if not path.exists():
        raise UsageError(f"{str(path)!r} does not exist")
    return path, tolerance


def _report(args: list[str]) -> int:
    from lora_lab.report import write_report
    from lora_lab.results import RESULTS_CSV, find_results, read_results

    path, tolerance = _report_args(args)
    records, problems = find_results(path) if path.is_dir() else ([], [])
    for problem in problems:
        print(f"lora-lab: warning: {problem}", file=sys.stderr)
    if records:  # a study: rebuild its table from its runs' result.json
        from lora_lab.pipeline.record import write_results_csv

        frame, _ = write_results_csv(path)
        report = write_report(path, tolerance)
        print(f"{len(frame)} runs → {path / RESULTS_CSV}, {report}")
        return 0
    table = path / RESULTS_CSV if path.is_dir() else path
    if not table.is_file():
        raise UsageError(f"no run results (result.json) or {RESULTS_CSV} found under {str(path)!r}")
    if table.suffix != ".csv":
        raise UsageError(f"{str(table)!r} is not a .csv results table")
    frame = read_results(table)  # a missing column: one line naming it
    report = write_report(table, tolerance)
    print(f"{len(frame)} runs from {table} → {report}")
    return 0


def _analyze(args: list[str]) -> int:
    from lora_lab.analysis import analyze_study
    from lora_lab.report import write_report

    study = _study_dir(args, "analyze")
    table = analyze_study(study)
    print(f"{len(table)} rows → {study / 'analysis.csv'}")
    if (study / "results.csv").is_file():
        print(f"report updated: {write_report(study)}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `lora-lab` console script."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args or os.environ.get("LORA_LAB_DEBUG", "") not in ("", "0")
    args = [arg for arg in args if arg != "--debug"]
    if not args or args[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    command, rest = args[0], args[1:]
    if command in ("sweep", "train"):
        return _hydra_command(command, rest, debug)
    if command == "report":
        return _guard(lambda: _report(rest), debug)
    if command == "analyze":
        return _guard(lambda: _analyze(rest), debug)
    return _fail(
        f"unknown command {command!r}; choose one of sweep, train, report, analyze (lora-lab --help)"
    )


def run() -> NoReturn:
    """The console script: `main`, then a quick exit.

    With torch, Lightning and their imports loaded, CPython's own teardown (freeing every
    module and object one by one) takes about 2 s on a 2-core machine, every time, after the
    work is done. So once `main` has returned, this does what matters of a normal exit —
    waits for non-daemon threads, runs the atexit handlers (logging's flush and close,
    loggers', multiprocessing's), flushes stdout and stderr — and ends the process with
    `os._exit`. An exception escaping `main` takes the normal path (traceback, full exit).
    """
    code = main()
    import atexit
    import threading

    for thread in threading.enumerate():
        if thread is not threading.main_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        # a closed pipe or stream: nothing more can be written
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    os._exit(code)


if __name__ == "__main__":
    run()
