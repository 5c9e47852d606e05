"""Data layer: LightningDataModules for image datasets and the synthetic linear-shift task.

Every DataModule serves batches ``(x, y)`` through a plain ``DataLoader`` whose dataset builds
whole batches from in-memory tensors (see :mod:`lora_lab.data.loader`). Image datasets are
decoded once into uint8 tensors and cached on disk (see :mod:`lora_lab.data.cache`).
"""

from lora_lab.data.base import BatchedDataModule
from lora_lab.data.cache import CACHE_ENV, clear_memory_cache, load_dataset, resolve_cache_dir
from lora_lab.data.classes import resolve_classes
from lora_lab.data.errors import DataError
from lora_lab.data.linear_shift import LinearShiftDataModule
from lora_lab.data.loader import (
    BatchTensorDataset,
    EpochShuffleSampler,
    NormalizeImages,
    RandomCropFlip,
    collate_batch,
)
from lora_lab.data.registry import DATAMODULES, make_datamodule
from lora_lab.data.sources import DATA_ENV, DEBIAN_FASHION_MNIST
from lora_lab.data.vision import (
    CIFAR10DataModule,
    FashionMNISTDataModule,
    MNISTDataModule,
    VisionDataModule,
)

__all__ = [
    "CACHE_ENV",
    "DATAMODULES",
    "DATA_ENV",
    "DEBIAN_FASHION_MNIST",
    "BatchTensorDataset",
    "BatchedDataModule",
    "CIFAR10DataModule",
    "DataError",
    "EpochShuffleSampler",
    "FashionMNISTDataModule",
    "LinearShiftDataModule",
    "MNISTDataModule",
    "NormalizeImages",
    "RandomCropFlip",
    "VisionDataModule",
    "clear_memory_cache",
    "collate_batch",
    "load_dataset",
    "make_datamodule",
    "resolve_cache_dir",
    "resolve_classes",
]
