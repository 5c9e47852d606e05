"""Dataset names → DataModule classes, and a factory that reports unknown names clearly."""

from __future__ import annotations

from typing import Any

from lora_lab.data.base import BatchedDataModule
from lora_lab.data.errors import DataError
from lora_lab.data.linear_shift import LinearShiftDataModule
from lora_lab.data.vision import CIFAR10DataModule, FashionMNISTDataModule, MNISTDataModule

DATAMODULES: dict[str, type[BatchedDataModule]] = {
    "fashion_mnist": FashionMNISTDataModule,
    "mnist": MNISTDataModule,
    "cifar10": CIFAR10DataModule,
    "linear_shift": LinearShiftDataModule,
}


def make_datamodule(name: str, **kwargs: Any) -> BatchedDataModule:
    """Build the DataModule registered as ``name`` with constructor ``kwargs``.

    Raises:
        DataError: for an unknown name, listing the valid ones.
    """
    try:
        datamodule_class = DATAMODULES[name]
    except KeyError:
        raise DataError(
            f"unknown dataset {name!r}; valid names: {', '.join(DATAMODULES)}"
        ) from None
    return datamodule_class(**kwargs)
