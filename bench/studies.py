"""A whole study, fused against sequential: the LoRA stage's wall time and the result table.

The same `lora-lab sweep experiment=<name>` runs twice per seed, one after the other in
subprocesses of this one: `sweep.fused=false` (each run its own Trainer) and the default fused
path. The LoRA stage is timed from the last result before it (pretrain, full finetune) to the
last LoRA result (file times). Prints the ratio fused / sequential against `--target`, how
many passes the fused study trained, and the per-(method, rank, lr) test accuracy means of
both paths over the seeds (within 0.5 points).

  methods study:  python bench/studies.py --experiment fashion_mnist_methods --target 0.35
  ConvNet study:  python bench/studies.py --experiment fashion_mnist_convnet_classes --target 0.5

`--tiny` runs on a few hundred fake images for a few batches (the smoke test of
tests/test_bench.py): its timings mean nothing.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
from _compare import lora_stage_seconds, print_mean_gap  # bench/ is the script's folder

FASHION = Path("/usr/share/datasets/fashion-mnist")


def tiny_overrides(folder: Path) -> list[str]:
    """Fake Fashion-MNIST files and settings for a study of a few seconds."""
    from lora_lab.data.fakes import write_fake_mnist

    data = write_fake_mnist(folder / "fashion", n_train=600, n_test=100)
    return [
        f"data.root={data}",
        "data.val_size=100",
        "data.batch_size=128",
        "trainer.limit_train_batches=2",
        "trainer.limit_val_batches=1",
    ]


def sweep(args: argparse.Namespace, out: Path, extra: list[str], seed: str, fused: bool) -> float:
    """Run one study; returns the LoRA stage's seconds."""
    cmd = [
        sys.executable,
        "-m",
        "lora_lab.cli",
        "sweep",
        f"experiment={args.experiment}",
        f"sweep.seeds=[{seed}]",
        f"sweep.fused={str(fused).lower()}",
        # training time only: the exactness certificate's retrained members are not timed
        "sweep.verify=0",
        "trainer.enable_progress_bar=false",
        f"output_dir={out}",
        *([f"sweep.ranks=[{args.ranks}]"] if args.ranks else []),
        *([f"stages.lora.max_epochs={args.epochs}"] if args.epochs else []),
        *extra,
        *args.overrides,
    ]
    return lora_stage_seconds(cmd, out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiment", default="fashion_mnist_methods")
    parser.add_argument("--target", type=float, default=0.35, help="the ratio to reach")
    parser.add_argument("--seeds", default="0", help="seeds; the first is timed")
    parser.add_argument("--ranks", default=None, help="sweep.ranks (default: the study's)")
    parser.add_argument("--epochs", type=int, default=None, help="LoRA epochs (the study's)")
    parser.add_argument("--tiny", action="store_true", help="fake data, a few batches")
    parser.add_argument("overrides", nargs="*", help="more Hydra overrides for both paths")
    args = parser.parse_args()
    tables: dict[str, list[pd.DataFrame]] = {"sequential": [], "fused": []}
    seconds: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        if args.tiny:
            extra = tiny_overrides(folder)
        elif (FASHION / "train-images-idx3-ubyte.gz").is_file():
            extra = [f"data.root={FASHION}"]
        else:
            sys.exit(f"bench/studies.py needs Fashion-MNIST in {FASHION} (make data), or --tiny")
        extra.append(f"data.cache_dir={folder / 'cache'}")
        started = time.perf_counter()
        for index, seed in enumerate(args.seeds.split(",")):
            for name in tables:
                out = folder / f"{name}_{seed}"
                taken = sweep(args, out, extra, seed, fused=name == "fused")
                if index == 0:
                    seconds[name] = taken
                table = pd.read_csv(out / "results.csv")
                tables[name].append(table[table.stage == "lora"])
    lora = {name: pd.concat(parts) for name, parts in tables.items()}
    fused = lora["fused"]
    passes = fused.groupby("seed")["pass"].nunique().max()
    ratio = seconds["fused"] / seconds["sequential"]
    print(
        f"{args.experiment}, LoRA stage, {len(tables['fused'][0])} runs: sequential "
        f"{seconds['sequential']:.1f} s, fused {seconds['fused']:.1f} s; at most {passes} "
        f"pass{'es' if passes > 1 else ''} per seed ({time.perf_counter() - started:.0f} s in all)"
    )
    verdict = "PASS" if ratio <= args.target else "FAIL"
    print(f"ratio fused / sequential = {ratio:.3f}  (target ≤ {args.target})  {verdict}")
    keys = [k for k in ("method", "rank", "learning_rate") if fused[k].notna().any()]
    means = pd.DataFrame(
        {name: table.groupby(keys, dropna=False).test_acc.mean() for name, table in lora.items()}
    )
    print_mean_gap(means, "fused", "sequential", args.seeds)


if __name__ == "__main__":
    main()
