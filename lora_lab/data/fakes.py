"""Small datasets written in the exact on-disk formats, for tests and offline demos.

The files go through the same readers as the real ones, so code paths are exercised end to
end without a download. Labels cycle through all 10 classes so every class subset is
non-empty; each image is its class's fixed random template blended with random noise, so a
network learns the classes within a few steps (a study's runs then end above chance, which
the pipeline requires of a run that did not diverge).
"""

from __future__ import annotations

import pickle
from pathlib import Path

import torch

from lora_lab.data.formats import write_cifar_batch, write_idx
from lora_lab.data.specs import CIFAR10

TEMPLATE_WEIGHT = 3  # quarters of each pixel that come from its class's template


def _images_and_labels(
    count: int,
    shape: tuple[int, ...],
    generator: torch.Generator,
    learnable: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    noise = torch.randint(0, 256, (count, *shape), dtype=torch.int64, generator=generator)
    labels = (torch.arange(count) % 10)[torch.randperm(count, generator=generator)]
    # The templates are drawn from a generator of their own: every split shares them.
    templates = torch.randint(0, 256, (10, *shape), generator=torch.Generator().manual_seed(10))
    weight = TEMPLATE_WEIGHT if learnable else 0  # 0: pure noise, accuracy stays at chance
    images = (weight * templates[labels] + (4 - weight) * noise) // 4
    return images.to(torch.uint8), labels


def write_fake_mnist(
    root: str | Path,
    n_train: int = 600,
    n_test: int = 100,
    *,
    folder: str | None = None,
    gz: bool = True,
    seed: int = 0,
    learnable: bool = True,
) -> Path:
    """Write the four IDX files of an MNIST-like dataset.

    Args:
        root: Base folder.
        n_train: Training images.
        n_test: Test images.
        folder: ``None`` to write into ``root`` itself; ``"FashionMNIST"`` or ``"MNIST"`` for
            torchvision's ``<root>/<folder>/raw`` layout.
        gz: Gzip the files (as distributed) or write them raw.
        seed: Seed of the random pixels and label order.
        learnable: Blend in the class templates; False: pure noise (no network beats chance).

    Returns:
        The folder holding the files.
    """
    directory = Path(root) if folder is None else Path(root) / folder / "raw"
    directory.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    suffix = ".gz" if gz else ""
    for prefix, count in (("train", n_train), ("t10k", n_test)):
        images, labels = _images_and_labels(count, (28, 28), generator, learnable)
        write_idx(directory / f"{prefix}-images-idx3-ubyte{suffix}", images)
        write_idx(directory / f"{prefix}-labels-idx1-ubyte{suffix}", labels)
    return directory


def write_fake_cifar10(
    root: str | Path,
    n_per_batch: int = 100,
    n_test: int = 100,
    *,
    torchvision_layout: bool = True,
    seed: int = 0,
) -> Path:
    """Write ``data_batch_1..5``, ``test_batch`` and ``batches.meta`` as CIFAR-10 pickles.

    Args:
        root: Base folder.
        n_per_batch: Images in each of the five training batches.
        n_test: Test images.
        torchvision_layout: Write into ``<root>/cifar-10-batches-py`` (else into ``root``).
        seed: Seed of the random pixels and label order.

    Returns:
        The folder holding the files.
    """
    directory = Path(root) / "cifar-10-batches-py" if torchvision_layout else Path(root)
    directory.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    for name, count in [
        *((f"data_batch_{k}", n_per_batch) for k in range(1, 6)),
        ("test_batch", n_test),
    ]:
        images, labels = _images_and_labels(count, (3, 32, 32), generator)
        write_cifar_batch(directory / name, images, labels.tolist())
    meta = {
        b"label_names": [name.encode() for name in CIFAR10.class_names],
        b"num_cases_per_batch": n_per_batch,
        b"num_vis": 3072,
    }
    (directory / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    return directory
