"""Benchmark: one training epoch of Fashion-MNIST batches, lora_lab's fast path vs torchvision.

The reference is the straightforward Lightning + torchvision setup: ``FashionMNIST`` with
``ToTensor()`` + ``Normalize`` in a ``DataLoader`` (batch 1024, shuffled, num_workers=0) over
the same 55000 training images. Both run on Debian's real Fashion-MNIST, alternating, and the
medians are compared. Target: fast / torchvision <= 0.10.

Run: ``.venv/bin/python bench/data_loading.py`` (exit status 1 on FAIL).
"""

from __future__ import annotations

import logging
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from torch.utils.data import DataLoader, random_split
from torchvision import datasets, transforms
from torchvision.datasets.utils import extract_archive

# Run as a script from a checkout without `pip install -e .`: make the repo importable.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lora_lab.data import FashionMNISTDataModule, clear_memory_cache
from lora_lab.data.sources import DEBIAN_FASHION_MNIST
from lora_lab.data.specs import FASHION_MNIST

BATCH_SIZE = 1024
REPEATS = 5
TARGET_RATIO = 0.10


def _epoch_seconds(batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> float:
    start = time.perf_counter()
    count = 0
    for x, _ in batches:
        count += len(x)
    elapsed = time.perf_counter() - start
    assert count == 55000, count
    return elapsed


def _torchvision_root(scratch: Path) -> Path:
    """torchvision's raw layout (uncompressed files under FashionMNIST/raw) from Debian's .gz."""
    raw = scratch / "tv" / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for archive in DEBIAN_FASHION_MNIST.glob("*-ubyte.gz"):
        extract_archive(str(archive), str(raw))  # writes raw/<name without .gz>
    return scratch / "tv"


def _timed(label: str, build: Callable[[], object]) -> object:
    start = time.perf_counter()
    result = build()
    print(f"  {label:<44} {time.perf_counter() - start:7.3f} s")
    return result


def main() -> int:
    if not (DEBIAN_FASHION_MNIST / "train-images-idx3-ubyte.gz").is_file():
        print(f"SKIP: {DEBIAN_FASHION_MNIST} missing (apt-get install dataset-fashion-mnist)")
        return 0
    logging.basicConfig(level=logging.WARNING)
    print(f"load average before: {' '.join(f'{v:.2f}' for v in os.getloadavg())} (2 cores)")
    print(
        f"data_loading: one training epoch of Fashion-MNIST (55000 images, batch {BATCH_SIZE}), "
        f"torch threads {torch.get_num_threads()}"
    )
    with tempfile.TemporaryDirectory() as scratch_name:
        scratch = Path(scratch_name)
        print("setup (once, not part of the epoch times):")

        def fast_module() -> FashionMNISTDataModule:
            datamodule = FashionMNISTDataModule(cache_dir=scratch / "cache", batch_size=BATCH_SIZE)
            datamodule.setup("fit")
            return datamodule

        clear_memory_cache()
        _timed("lora_lab: decode .gz + write cache + split", fast_module)
        clear_memory_cache()
        fast = _timed("lora_lab: load from disk cache + split", fast_module)
        assert isinstance(fast, FashionMNISTDataModule)
        root = _timed("torchvision: gunzip into its raw layout", lambda: _torchvision_root(scratch))
        assert isinstance(root, Path)
        normalize = transforms.Normalize(FASHION_MNIST.mean, FASHION_MNIST.std)
        tv_full = _timed(
            "torchvision: FashionMNIST(train=True)",
            lambda: datasets.FashionMNIST(
                str(root),
                train=True,
                transform=transforms.Compose([transforms.ToTensor(), normalize]),
            ),
        )
        assert isinstance(tv_full, datasets.FashionMNIST)
        tv_train, _ = random_split(
            tv_full, [55000, 5000], generator=torch.Generator().manual_seed(0)
        )
        tv_loader = DataLoader(tv_train, batch_size=BATCH_SIZE, shuffle=True, num_workers=0)

        fast_times: list[float] = []
        tv_times: list[float] = []
        fast_loader = fast.train_dataloader()
        for repeat in range(REPEATS):
            fast_loader.sampler.set_epoch(repeat)  # as Lightning does before each epoch
            fast_times.append(_epoch_seconds(fast_loader))
            tv_times.append(_epoch_seconds(tv_loader))
            print(
                f"  repeat {repeat + 1}/{REPEATS}: fast {fast_times[-1]:.3f} s, "
                f"torchvision {tv_times[-1]:.3f} s"
            )

    fast_median, tv_median = statistics.median(fast_times), statistics.median(tv_times)
    ratio = fast_median / tv_median
    verdict = "PASS" if ratio <= TARGET_RATIO else "FAIL"
    print(f"median epoch, lora_lab fast path (__getitems__ batches): {fast_median:.3f} s")
    print(f"median epoch, torchvision ToTensor+Normalize DataLoader: {tv_median:.3f} s")
    print(f"ratio fast/torchvision: {ratio:.4f}  (target <= {TARGET_RATIO:.2f})  {verdict}")
    return 0 if verdict == "PASS" else 1


if __name__ == "__main__":
    sys.exit(main())
