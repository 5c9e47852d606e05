"""`lora-lab`: the command line. `sweep` and `train` are Hydra apps; `report` and `analyze`
take a study folder.

Bad input ends in one line on stderr and exit code 2; `--debug` (or LORA_LAB_DEBUG=1) shows
the full traceback instead.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

from lora_lab.cli.errors import UsageError, fail, guard
from lora_lab.cli.folders import analyze_command, report_command
from lora_lab.cli.hydra_app import hydra_command
from lora_lab.config_path import config_dir

__all__ = ["CONF_DIR", "USAGE", "UsageError", "main", "run"]

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
  lora-lab sweep sweep.seeds=auto                  # add seeds until the verdict is settled
  lora-lab sweep sweep.lr_extend=0                 # no grid steps past an edge choice (default 2)
  lora-lab sweep sweep.fused=false                 # every LoRA run under its own Trainer
  lora-lab sweep sweep.verify=3                    # retrain 3 fused runs alone (default 1; 0: off)
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
        return hydra_command(command, rest, debug)
    if command == "report":
        return guard(lambda: report_command(rest), debug)
    if command == "analyze":
        return guard(lambda: analyze_command(rest), debug)
    return fail(
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
