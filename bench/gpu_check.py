"""GPU check, ready to run on a machine with a CUDA device (< 8 minutes on one H200).

One line per check:
1. exactness: the same LoRA grid (ranks 1,4,16 × lr 1e-3,3e-3) fused and sequential on the
   device in fp32; every adapter tensor must agree within 1e-4.
2. bf16-mixed: a fused sweep under `trainer.precision=bf16-mixed` finishes, every run `ok`, in
   one pass.
3. speed: a 21-run grid (ranks 1–64 × 3 learning rates), fused against sequential; the LoRA
   stage's wall time of each, and the ratio.
4. the default study (`lora-lab sweep trainer=gpu`, nothing else changed): its wall time, the
   device line it printed first, and its recommendation.
5. a 64-member fused pass: its training step time against one member alone under the same
   Trainer settings (the fused pass does 64 runs' work per step).

Uses Fashion-MNIST from Debian's package when present, else writes random images in its file
format (the timings need only the shapes). `--accelerator cpu --tiny` runs every check on tiny
settings on the CPU: the smoke test of this script (tests/test_bench.py).

Usage: python bench/gpu_check.py [--accelerator gpu] [--epochs 3] [--tiny]
"""

from __future__ import annotations

import argparse
import functools
import logging
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import pandas as pd
import torch
from lightning.pytorch.callbacks import Callback
from safetensors.torch import load_file
from torch.utils.data import DataLoader, TensorDataset

from lora_lab.lora import LoRAConfig
from lora_lab.models import MLP
from lora_lab.models.fused import FusedLoRAModule
from lora_lab.models.module import LoRAClassifierModule

FASHION = Path("/usr/share/datasets/fashion-mnist")


class CheckFailed(RuntimeError):
    """A check could not run to its end (its line says FAIL and the next check runs)."""


def lora_lab(out: Path, *overrides: str) -> tuple[float, str]:
    """Run `lora-lab sweep` into `out`; returns the LoRA stage's wall seconds and stderr."""
    cmd = [sys.executable, "-m", "lora_lab.cli", "sweep", *overrides, f"output_dir={out}"]
    start = time.perf_counter()
    done = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if done.returncode:
        raise CheckFailed(f"{' '.join(cmd)} exited {done.returncode}:\n{done.stderr[-3000:]}")
    full = min(p.stat().st_mtime for p in (out / "runs").glob("full_finetune*/result.json"))
    ends = [p.stat().st_mtime for p in (out / "runs").glob("lora_*/result.json")]
    return (max(ends) - full if ends else time.perf_counter() - start), done.stderr


def adapter_gap(left: Path, right: Path) -> float:
    """The largest |difference| between the adapters of two studies (same names)."""
    gap = 0.0
    for path in sorted((left / "adapters").glob("*/adapter_model.safetensors")):
        a, b = load_file(path), load_file(right / path.relative_to(left))
        gap = max(gap, *((a[k].float() - b[k].float()).abs().max().item() for k in a))
    return gap


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def check_exact_and_bf16(folder: Path, common: list[str], epochs: int, tiny: bool) -> None:
    ranks, lrs = ("[1,4]", "[1e-3]") if tiny else ("[1,4,16]", "[1e-3,3e-3]")
    small = [*common, f"sweep.ranks={ranks}", f"sweep.learning_rates={lrs}"]
    small += [f"stages.lora.max_epochs={epochs}", "stages.full_finetune.learning_rates=null"]
    lora_lab(folder / "exact_fused", *small)
    lora_lab(folder / "exact_seq", *small, "sweep.fused=false")
    gap = adapter_gap(folder / "exact_fused", folder / "exact_seq")
    print(f"1. exactness fp32 fused vs sequential: max |Δadapter| = {gap:.2e} (≤ 1e-4) "
          f"{verdict(gap <= 1e-4)}", flush=True)  # fmt: skip

    lora_lab(folder / "bf16", *small, "trainer.precision=bf16-mixed")
    table = pd.read_csv(folder / "bf16" / "results.csv")
    lora = table[table.stage == "lora"]
    ok = bool((lora.status == "ok").all() and lora["pass"].nunique() == 1)
    print(f"2. bf16-mixed fused sweep: {len(lora)} runs in {lora['pass'].nunique()} pass, "
          f"test_acc {lora.test_acc.min():.4f}–{lora.test_acc.max():.4f} {verdict(ok)}",
          flush=True)  # fmt: skip


def check_grid(folder: Path, common: list[str], epochs: int, tiny: bool) -> None:
    ranks, lrs = ("[1,2]", "[1e-3,3e-3]") if tiny else ("[1,2,4,8,16,32,64]", "[3e-4,1e-3,3e-3]")
    grid = [*common, f"sweep.ranks={ranks}", f"sweep.learning_rates={lrs}"]
    grid += [f"stages.lora.max_epochs={epochs}", "stages.full_finetune.learning_rates=null"]
    fused, _ = lora_lab(folder / "grid_fused", *grid)
    sequential, _ = lora_lab(folder / "grid_seq", *grid, "sweep.fused=false")
    runs = len(pd.read_csv(folder / "grid_fused" / "results.csv").query("stage == 'lora'"))
    print(f"3. {runs}-run grid, LoRA stage: sequential {sequential:.1f} s, fused {fused:.1f} s, "
          f"ratio fused / sequential = {fused / sequential:.3f}", flush=True)  # fmt: skip


def check_default_study(folder: Path, data: list[str], accelerator: str, tiny: bool) -> None:
    trainer = "trainer=gpu" if accelerator == "gpu" else f"trainer.accelerator={accelerator}"
    extra = ["trainer.max_epochs=1", "sweep.ranks=[1,4]", "trainer.limit_train_batches=3"]
    start = time.perf_counter()
    _, log = lora_lab(folder / "default", *data, trainer, *(extra if tiny else []))
    seconds = time.perf_counter() - start
    lines = [line for line in log.splitlines() if line.strip()]
    # the study's first line (a CUDA machine may print library warnings before it)
    device = next((line for line in lines if line.startswith("training ")), "")
    answer = next((line for line in reversed(lines) if line.startswith("recommended")), "")
    print(f"4. default study on {trainer}: {seconds:.1f} s wall; {device!r}; "
          f"{answer[:120]} {verdict(bool(device))}", flush=True)  # fmt: skip


class StepTimer(Callback):
    """Wall time of the training steps after `warmup` steps (the device synchronised at
    both ends)."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.start, self.seconds, self.steps = warmup, 0.0, 0.0, 0

    def _sync(self, module: L.LightningModule) -> None:
        if module.device.type == "cuda":
            torch.cuda.synchronize(module.device)

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:  # type: ignore[no-untyped-def]
        if batch_idx == self.warmup:
            self._sync(module)
            self.start = time.perf_counter()

    def on_train_end(self, trainer, module) -> None:  # type: ignore[no-untyped-def]
        self._sync(module)
        self.steps = trainer.global_step - self.warmup
        self.seconds = time.perf_counter() - self.start


def step_seconds(module: L.LightningModule, accelerator: str, steps: int, warmup: int) -> float:
    """Seconds per training step of `module` on random Fashion-MNIST-shaped batches of 1024."""
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(1024 * (steps + warmup), 1, 28, 28, generator=generator)
    labels = torch.randint(0, 10, (len(images),), generator=generator)
    timer = StepTimer(warmup)
    trainer = L.Trainer(
        accelerator=accelerator, devices=1, max_steps=steps + warmup, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[timer], deterministic="warn",
    )  # fmt: skip
    trainer.fit(module, DataLoader(TensorDataset(images, labels), batch_size=1024))
    return timer.seconds / timer.steps


def check_wide_pass(accelerator: str, tiny: bool) -> None:
    members, steps, warmup = (4, 3, 1) if tiny else (64, 50, 10)
    for name in ("lightning.pytorch", "lightning.fabric", "lora_lab"):  # banners and tips
        logging.getLogger(name).setLevel(logging.ERROR)
    adam = functools.partial(torch.optim.Adam, lr=1e-3)

    def member(index: int) -> LoRAClassifierModule:
        torch.manual_seed(0)
        network = MLP(input_shape=(1, 28, 28), num_classes=10, hidden_sizes=(64, 64))
        torch.manual_seed(index + 1)
        rank = 2 ** (index % 7)  # ranks 1…64, as a grid has them
        return LoRAClassifierModule(
            network=network, lora=LoRAConfig(rank=rank, alpha=rank), optimizer=adam
        )

    alone = step_seconds(member(6), accelerator, steps, warmup)
    fused = step_seconds(FusedLoRAModule([member(k) for k in range(members)]), accelerator,
                         steps, warmup)  # fmt: skip
    print(f"5. {members}-member fused pass: {1e3 * fused:.2f} ms/step against "
          f"{1e3 * alone:.2f} ms/step for one member (r=64) alone: {fused / alone:.2f}× the "
          f"time for {members}× the runs", flush=True)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--accelerator", default="gpu")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--tiny", action="store_true", help="tiny settings (smoke test)")
    args = parser.parse_args()
    epochs = 1 if args.tiny else args.epochs
    print(f"torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}"
          + (f", {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""),
          flush=True)  # fmt: skip
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
            "sweep.seeds=[0]",
        ]
        if args.tiny:
            common += ["trainer.limit_train_batches=3", "trainer.limit_val_batches=2"]
            # Three steps cannot teach a new task: on the same task the finetunes inherit the
            # pretrain's accuracy, above chance (a run at chance is `diverged`).
            common.append("experiment=fashion_mnist_rank_sweep")
        checks = [
            lambda: check_exact_and_bf16(folder, common, epochs, args.tiny),
            lambda: check_grid(folder, common, epochs, args.tiny),
            lambda: check_default_study(folder, data, args.accelerator, args.tiny),
            lambda: check_wide_pass(args.accelerator, args.tiny),
        ]
        failed = 0
        for check in checks:
            try:
                check()
            except (CheckFailed, RuntimeError) as error:  # say it, and run the next check
                failed += 1
                print(f"FAIL: {error}", flush=True)
    if failed:
        sys.exit(f"{failed} check(s) could not run to their end")


if __name__ == "__main__":
    main()
