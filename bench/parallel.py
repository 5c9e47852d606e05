"""Parallel sweep speedup: the same `lora-lab sweep` with `sweep.jobs=1` and `sweep.jobs=2`.

A sweep of small runs on Fashion-MNIST (the real files when present, else random images in
the same format): the default MLP, pretrain 1 epoch, then the full finetune and LoRA at every
rank for `--epochs` epochs each. Each sweep runs as its own `python -m lora_lab.cli sweep`
subprocess into a fresh folder, timed by wall clock (imports included), in alternating order
over `--repeats` rounds because the machine may be shared; a first untimed sweep fills the
data cache. Prints every wall time, then the medians and the best times side by side with
their ratios (the best of several rounds is the least disturbed on a shared machine): the
speedup of jobs=2 over jobs=1. On 2 idle cores it stays below 2: pretrain runs alone, and
each worker first spends seconds importing torch and Lightning.

A control sweep runs jobs=1 with one torch thread (OMP_NUM_THREADS=1), the thread budget each
parallel run gets. Against it the ratio shows what running runs side by side gains by itself;
against the default jobs=1 (one thread per core) it also includes what fewer threads per run
gain, which on a busy machine can be most of it (small ops wait for every thread).

Usage: python bench/parallel.py [--ranks 1,2,4,...] [--epochs N] [--repeats N] [--jobs N]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
FASHION = Path("/usr/share/datasets/fashion-mnist")


def sweep_command(out: Path, overrides: list[str], jobs: int) -> list[str]:
    """The `lora-lab sweep` command line for one timed sweep."""
    return [
        sys.executable,
        "-m",
        "lora_lab.cli",
        "sweep",
        *overrides,
        f"sweep.jobs={jobs}",
        f"output_dir={out}",
    ]


def timed(cmd: list[str], threads: int | None = None) -> float:
    """Wall seconds of `cmd` (with OMP_NUM_THREADS=`threads` if given); exits if it fails."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    start = time.perf_counter()
    done = subprocess.run(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env
    )
    if done.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    return time.perf_counter() - start


def accuracy_gap(first: Path, second: Path) -> float:
    """Largest |test_acc difference| between the same runs of two studies."""
    tables = [
        pd.read_csv(study / "results.csv").set_index("run_id").test_acc for study in (first, second)
    ]
    return float((tables[0] - tables[1]).abs().max())


def load() -> str:
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


def main() -> None:
    # A TERM (e.g. from `timeout`) ends like Ctrl-C, so the temp folder is still removed.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    work = Path(tempfile.mkdtemp(prefix="bench_parallel_"))
    try:
        bench(work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def bench(work: Path) -> None:
    """Run the sweeps in `work` and print the timings."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", default="1,2,4,8,16,32,64", help="LoRA ranks of the sweep")
    parser.add_argument("--epochs", type=int, default=3, help="epochs of each run after pretrain")
    parser.add_argument(
        "--repeats", type=int, default=2, help="rounds (one sweep per setting each)"
    )
    parser.add_argument("--jobs", type=int, default=2, help="sweep.jobs of the parallel sweep")
    args = parser.parse_args()

    if (FASHION / "train-images-idx3-ubyte.gz").is_file():
        root, data = FASHION, "Fashion-MNIST (real files)"
    else:
        sys.path.insert(0, str(ROOT))
        from lora_lab.data.fakes import write_fake_mnist

        root = write_fake_mnist(work / "fashion", n_train=60000, n_test=10000)
        data = "random images in Fashion-MNIST format"
    ranks = [int(r) for r in args.ranks.split(",")]
    overrides = [
        f"data.root={root}",
        f"data.cache_dir={work / 'cache'}",
        f"sweep.ranks=[{args.ranks}]",
        "stages.pretrain.max_epochs=1",
        f"trainer.max_epochs={args.epochs}",
        "trainer.enable_progress_bar=false",
    ]
    print(f"cores: {os.cpu_count()}, load average before: {load()}")
    print(
        f"sweep: pretrain 1 epoch, then {len(ranks) + 1} runs of {args.epochs} epochs "
        f"(full finetune, LoRA ranks {args.ranks}); {data}, MLP 784-64-64-10, batch 256"
    )
    timed(
        sweep_command(work / "warmup", [*overrides, "sweep.ranks=[1]", "trainer.max_epochs=1"], 1)
    )

    # (label, sweep.jobs, OMP_NUM_THREADS or None for torch's default: one thread per core)
    settings = [
        ("sweep.jobs=1", 1, None),
        (f"sweep.jobs={args.jobs}", args.jobs, None),
        ("sweep.jobs=1, 1 thread (control)", 1, 1),
    ]
    seconds: dict[str, list[float]] = {label: [] for label, _, _ in settings}
    studies: dict[str, Path] = {}
    for repeat in range(args.repeats):
        for index, (label, jobs, threads) in enumerate(settings[:: 1 if repeat % 2 == 0 else -1]):
            out = work / f"round{repeat}_{index}"
            took = timed(sweep_command(out, overrides, jobs), threads)
            seconds[label].append(took)
            studies[label] = out
            print(f"  round {repeat + 1}: {label:<34} {took:6.1f} s", flush=True)

    print(f"load average after: {load()}")
    # Median and best of the rounds: on a shared machine the best is the least disturbed.
    for name, pick in (("median", statistics.median), ("best", min)):
        serial, parallel, control = (pick(seconds[label]) for label, _, _ in settings)
        print(f"wall time, {name} of {args.repeats}:")
        print(
            f"  sweep.jobs=1 {serial:.1f} s | sweep.jobs={args.jobs} {parallel:.1f} s | "
            f"speedup = {serial / parallel:.2f}x"
        )
        print(
            f"  control, sweep.jobs=1 with 1 thread {control:.1f} s | sweep.jobs={args.jobs} "
            f"{parallel:.1f} s | speedup from side-by-side runs alone = {control / parallel:.2f}x"
        )
    gap = accuracy_gap(studies[settings[0][0]], studies[settings[1][0]])
    print(
        f"max |test_acc difference| jobs=1 vs jobs={args.jobs}: {gap:.4f} "
        "(fewer threads per run may reorder float sums)"
    )


if __name__ == "__main__":
    main()
