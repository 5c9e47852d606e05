"""A rank × learning-rate grid, fused against sequential: the LoRA stage's wall time.

The default study's network and data (784-64-64-10 MLP, real Fashion-MNIST, batch 256), LoRA
ranks 1–64 × 3 learning rates × 1 seed, 5 epochs each: 21 runs. The same `lora-lab sweep`
runs twice, one after the other in subprocesses of this one: `sweep.fused=false` (each run
its own Trainer) and the default fused path (all 21 in one pass). The LoRA stage is timed
from the full-finetune result to the last LoRA result (file times), so pretrain and the
full finetune (1 epoch each here) do not count. Prints the ratio fused / sequential (target
≤ 0.20, moonshot ≤ 0.12) and, with --seeds 0,1,2, the per-(rank, lr) test accuracy means of
both paths over the seeds (within 0.5 points).

Usage: python bench/grid.py [--epochs 5] [--ranks 1,2,...,64] [--lrs 3e-4,1e-3,3e-3]
                            [--seeds 0]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import pandas as pd
from _compare import lora_stage_seconds, print_mean_gap  # bench/ is the script's folder

FASHION = Path("/usr/share/datasets/fashion-mnist")


def sweep(args: argparse.Namespace, out: Path, cache: Path, seed: str, fused: bool) -> float:
    """Run one study; returns the LoRA stage's seconds."""
    cmd = [
        sys.executable,
        "-m",
        "lora_lab.cli",
        "sweep",
        f"sweep.ranks=[{args.ranks}]",
        f"sweep.learning_rates=[{args.lrs}]",
        f"sweep.seeds=[{seed}]",
        f"sweep.fused={str(fused).lower()}",
        # training time only: the exactness certificate's retrained members are not timed
        "sweep.verify=0",
        "trainer.enable_progress_bar=false",
        "stages.pretrain.max_epochs=1",
        "stages.full_finetune.max_epochs=1",
        f"stages.lora.max_epochs={args.epochs}",
        f"data.cache_dir={cache}",
        f"output_dir={out}",
    ]
    return lora_stage_seconds(cmd, out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--ranks", default="1,2,4,8,16,32,64")
    parser.add_argument("--lrs", default="3e-4,1e-3,3e-3")
    parser.add_argument("--seeds", default="0", help="seeds; the first is timed")
    args = parser.parse_args()
    if not (FASHION / "train-images-idx3-ubyte.gz").is_file():
        sys.exit(f"bench/grid.py needs Fashion-MNIST in {FASHION} (make data)")
    tables: dict[str, list[pd.DataFrame]] = {"sequential": [], "fused": []}
    seconds: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for index, seed in enumerate(args.seeds.split(",")):
            for name in tables:
                out = folder / f"{name}_{seed}"
                taken = sweep(args, out, folder / "cache", seed, fused=name == "fused")
                if index == 0:
                    seconds[name] = taken
                table = pd.read_csv(out / "results.csv")
                tables[name].append(table[table.stage == "lora"])
    lora = {name: pd.concat(parts) for name, parts in tables.items()}
    passes = lora["fused"]["pass"].nunique()
    ratio = seconds["fused"] / seconds["sequential"]
    verdict = "PASS" if ratio <= 0.20 else "FAIL"
    print(
        f"LoRA stage, {len(tables['fused'][0])} runs × {args.epochs} epochs: "
        f"sequential {seconds['sequential']:.1f} s, fused {seconds['fused']:.1f} s "
        f"({passes} pass{'es' if passes > 1 else ''} over the seeds)"
    )
    print(f"ratio fused / sequential = {ratio:.3f}  (target ≤ 0.20, moonshot ≤ 0.12)  {verdict}")
    means = pd.DataFrame(
        {
            name: table.groupby(["rank", "learning_rate"]).test_acc.mean()
            for name, table in lora.items()
        }
    )
    print_mean_gap(means, "fused", "sequential", args.seeds)


if __name__ == "__main__":
    main()
