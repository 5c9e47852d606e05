"""Two identical small jobs at once against one alone: how much they slow each other.

    python bench/concurrency.py            # target: two at once ≤ 2.5x one alone (2 cores)

Each job is a separate process on the offline Fashion-MNIST, into its own output folder: a
`lora-lab sweep` (pretrain → full finetune → LoRA ranks 1 and 4, fused), then, as the issue
reported it, a `lora-lab train stage=pretrain`. Measured side by side in one run, as ratios of
wall times:
- alone: one job by itself (timed before and after the others; the mean is used);
- two at once: both started together, each choosing its threads as lora_lab does by default
  (`threads=null`: its CPUs shared among the training processes it knows of);
- two at once, `threads=<all CPUs>` each: what every process did before, for reference.
Perfect sharing of the cores would make two at once take 2x one alone (less where one
process alone cannot keep every core busy).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def command(kind: str, out: Path, extra: list[str], batches: int) -> list[str]:
    """A small `lora-lab sweep`, or the `lora-lab train stage=pretrain` of the issue's report."""
    what = ["sweep", "sweep.ranks=[1,4]"] if kind == "sweep" else ["train", "stage=pretrain"]
    return [
        sys.executable,
        "-m",
        "lora_lab.cli",
        *what,
        f"output_dir={out}",
        "trainer.max_epochs=1",
        *([f"trainer.limit_train_batches={batches}"] if batches else []),
        *extra,
    ]


def run_together(
    kind: str, folder: Path, tag: str, count: int, extra: list[str], batches: int
) -> float:
    """Start `count` commands at once; the wall time until the last one ends."""
    start = time.perf_counter()
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    processes = [
        subprocess.Popen(
            command(kind, folder / f"{kind}_{tag}_{index}", extra, batches),
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for index in range(count)
    ]
    for process in processes:
        _, err = process.communicate()
        if process.returncode != 0:
            sys.exit(f"a sweep failed ({tag}):\n{err[-2000:]}")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--batches", type=int, default=0, help="training batches per epoch (0: all 215)"
    )
    args = parser.parse_args()
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"CPUs: {cpus}; 1 epoch of {args.batches or 'all'} batches a stage")
    print(
        "sweep = pretrain, full finetune, LoRA ranks 1 and 4; train = lora-lab train stage=pretrain"
    )
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        run_together("sweep", folder, "warmup", 1, [], args.batches)  # data cache, imports
        for kind in ("sweep", "train"):
            measure = lambda tag, count, extra=(), kind=kind: run_together(  # noqa: E731
                kind, folder, tag, count, list(extra), args.batches
            )
            alone = [measure("alone_a", 1)]
            pair = measure("pair", 2)
            forced = measure("forced", 2, [f"threads={cpus}"])
            alone.append(measure("alone_b", 1))
            one = sum(alone) / len(alone)
            print(f"{kind}: one alone {one:6.1f} s (runs {alone[0]:.1f}, {alone[1]:.1f})")
            print(
                f"{kind}: two at once, threads=null     {pair:6.1f} s  slowdown "
                f"{pair / one:5.2f}x  (target ≤ 2.5x)"
            )
            print(
                f"{kind}: two at once, threads={cpus} each   {forced:6.1f} s  slowdown "
                f"{forced / one:5.2f}x  (every core each: the behaviour before)"
            )


if __name__ == "__main__":
    main()
