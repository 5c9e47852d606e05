"""GPU check for fused sweeps, ready to run on a machine with a CUDA device (< 8 minutes).

1. exactness: the same LoRA grid (ranks 1,4,16 × lr 1e-3,3e-3) fused and sequential on CUDA
   in fp32; every adapter tensor must agree within 1e-4.
2. bf16-mixed: a fused sweep under `trainer.precision=bf16-mixed` finishes with finite losses.
3. speed: a 21-run grid (ranks 1–64 × 3 learning rates), fused against sequential; the LoRA
   stage's wall time of each, and the ratio.

Prints one line per check. Uses Fashion-MNIST from Debian's package when present, else writes
random images in its file format (the timings need only the shapes). `--accelerator cpu`
runs the same checks on the CPU (a smoke test of this script).

Usage: python bench/gpu_check.py [--accelerator gpu] [--epochs 3]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
from safetensors.torch import load_file

FASHION = Path("/usr/share/datasets/fashion-mnist")


def lora_lab(out: Path, *overrides: str) -> float:
    """Run `lora-lab sweep` into `out`; returns the LoRA stage's wall seconds."""
    cmd = [sys.executable, "-m", "lora_lab.cli", "sweep", *overrides, f"output_dir={out}"]
    start = time.perf_counter()
    done = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if done.returncode:
        sys.exit(f"FAIL: {' '.join(cmd)}\n{done.stderr[-3000:]}")
    full = (out / "runs" / "full_finetune" / "result.json").stat().st_mtime
    ends = [p.stat().st_mtime for p in (out / "runs").glob("lora_*/result.json")]
    return max(ends) - full if ends else time.perf_counter() - start


def adapter_gap(left: Path, right: Path) -> float:
    """The largest |difference| between the adapters of two studies (same names)."""
    gap = 0.0
    for path in sorted((left / "adapters").glob("*/adapter_model.safetensors")):
        a, b = load_file(path), load_file(right / path.relative_to(left))
        gap = max(gap, *((a[k].float() - b[k].float()).abs().max().item() for k in a))
    return gap


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--accelerator", default="gpu")
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    # cuBLAS is deterministic only with a fixed workspace (the exactness check needs it).
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        data = [f"data.cache_dir={folder / 'cache'}"]
        if not (FASHION / "train-images-idx3-ubyte.gz").is_file():
            from lora_lab.data.fakes import write_fake_mnist

            root = write_fake_mnist(folder / "fashion", n_train=20000, n_test=5000)
            data.append(f"data.root={root}")
            print(f"data: random images in Fashion-MNIST's format ({root})")
        common = [
            *data,
            f"trainer.accelerator={args.accelerator}",
            "trainer.devices=1",
            "trainer.deterministic=true",
            "trainer.enable_progress_bar=false",
            "data.batch_size=256",
            "stages.pretrain.max_epochs=1",
            "stages.full_finetune.max_epochs=1",
        ]
        small = [*common, "sweep.ranks=[1,4,16]", "sweep.learning_rates=[1e-3,3e-3]"]
        small.append(f"stages.lora.max_epochs={args.epochs}")
        lora_lab(folder / "exact_fused", *small)
        lora_lab(folder / "exact_seq", *small, "sweep.fused=false")
        gap = adapter_gap(folder / "exact_fused", folder / "exact_seq")
        print(
            f"exactness fp32 fused vs sequential: max |Δadapter| = {gap:.2e} (≤ 1e-4) "
            f"{'PASS' if gap <= 1e-4 else 'FAIL'}"
        )

        lora_lab(folder / "bf16", *small, "trainer.precision=bf16-mixed")
        table = pd.read_csv(folder / "bf16" / "results.csv")
        lora = table[table.stage == "lora"]
        ok = bool((lora.status == "ok").all() and lora["pass"].nunique() == 1)
        print(
            f"bf16-mixed fused sweep: {len(lora)} runs in {lora['pass'].nunique()} pass, "
            f"test_acc {lora.test_acc.min():.4f}–{lora.test_acc.max():.4f} "
            f"{'PASS' if ok else 'FAIL'}"
        )

        grid = [*common, "sweep.ranks=[1,2,4,8,16,32,64]", "sweep.learning_rates=[3e-4,1e-3,3e-3]"]
        grid.append(f"stages.lora.max_epochs={args.epochs}")
        fused = lora_lab(folder / "grid_fused", *grid)
        sequential = lora_lab(folder / "grid_seq", *grid, "sweep.fused=false")
        print(
            f"21-run grid, LoRA stage: sequential {sequential:.1f} s, fused {fused:.1f} s, "
            f"ratio fused / sequential = {fused / sequential:.3f}"
        )


if __name__ == "__main__":
    main()
