"""Fixed facts about each image dataset: files, layout, shape, classes, normalisation."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

_IDX_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
_CIFAR_FILES = (*(f"data_batch_{k}" for k in range(1, 6)), "test_batch")


@dataclass(frozen=True)
class DatasetSpec:
    """Fixed facts about one image dataset.

    Attributes:
        name: Registry name, e.g. ``"fashion_mnist"``.
        torchvision_class: Name of the torchvision dataset class, used for downloads.
        folder: torchvision's folder under a root (``"FashionMNIST"``, ``"cifar-10-batches-py"``).
        file_format: ``"idx"`` (MNIST family) or ``"cifar"`` (python pickles).
        input_shape: ``(C, H, W)`` of one image.
        class_names: The 10 class names, indexed by label.
        mean: Per-channel mean of the training pixels in [0, 1].
        std: Per-channel standard deviation of the training pixels in [0, 1].
    """

    name: str
    torchvision_class: str
    folder: str
    file_format: str
    input_shape: tuple[int, int, int]
    class_names: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def candidate_dirs(self, base: Path) -> list[Path]:
        """Folders under ``base`` where this dataset's files may sit, most specific first."""
        if self.file_format == "idx":
            return [base, base / self.folder / "raw"]
        return [base / self.folder, base]

    @property
    def file_names(self) -> tuple[str, ...]:
        """The required files in decoding order (IDX ones may also be ``.gz``)."""
        return _IDX_FILES if self.file_format == "idx" else _CIFAR_FILES


FASHION_MNIST = DatasetSpec(
    name="fashion_mnist",
    torchvision_class="FashionMNIST",
    folder="FashionMNIST",
    file_format="idx",
    input_shape=(1, 28, 28),
    class_names=(
        "T-shirt/top",
        "Trouser",
        "Pullover",
        "Dress",
        "Coat",
        "Sandal",
        "Shirt",
        "Sneaker",
        "Bag",
        "Ankle boot",
    ),
    mean=(0.2860,),
    std=(0.3530,),
)
MNIST = DatasetSpec(
    name="mnist",
    torchvision_class="MNIST",
    folder="MNIST",
    file_format="idx",
    input_shape=(1, 28, 28),
    class_names=("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"),
    mean=(0.1307,),
    std=(0.3081,),
)
CIFAR10 = DatasetSpec(
    name="cifar10",
    torchvision_class="CIFAR10",
    folder="cifar-10-batches-py",
    file_format="cifar",
    input_shape=(3, 32, 32),
    class_names=(
        "airplane",
        "automobile",
        "bird",
        "cat",
        "deer",
        "dog",
        "frog",
        "horse",
        "ship",
        "truck",
    ),
    mean=(0.4914, 0.4822, 0.4465),
    std=(0.2470, 0.2435, 0.2616),
)
