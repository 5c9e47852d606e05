"""DataModules for Fashion-MNIST, MNIST and CIFAR-10: splits, class subsets, normalisation."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

import torch
from torch import Tensor

from lora_lab.data.base import BatchedDataModule
from lora_lab.data.cache import DecodedDataset, load_dataset, resolve_cache_dir
from lora_lab.data.classes import ClassSelection, resolve_classes
from lora_lab.data.errors import DataError
from lora_lab.data.loader import BatchTensorDataset, NormalizeImages, RandomCropFlip
from lora_lab.data.sources import locate
from lora_lab.data.specs import CIFAR10, FASHION_MNIST, MNIST, DatasetSpec

log = logging.getLogger(__name__)
# (dataset, folder) pairs whose "loaded from" line this process has logged.
_ANNOUNCED: set[tuple[str, str]] = set()


class VisionDataModule(BatchedDataModule):
    """An image classification dataset served as normalised float batches.

    Train and validation are a seeded split of the official training set; test is the official
    test set. The split has a seed of its own (``split_seed``), fixed per study, so every stage
    and every run seed validates on the same images and none trains on them: a run seed that
    also drew the split let seeds ≠ 0 validate on images the pretrained network had seen.

    With ``classes`` only those classes are kept, with their original labels, so a 10-way head
    trained on classes 0-4 can be finetuned on 5-9. The test split keeps the same classes
    unless ``test_classes`` names others: finetune on three classes, test on all ten
    (``test_classes="all"``) to see what happens to the rest.

    Args:
        root: Folder holding the files (directly or in torchvision's layout); searched first.
        download: Let torchvision download into ``<cache_dir>/downloads`` if no folder has them.
        cache_dir: Cache folder; default ``$LORA_LAB_CACHE`` or ``~/.cache/lora_lab``.
        batch_size: Training batch size.
        eval_batch_size: Validation/test batch size; defaults to ``batch_size``.
        val_size: Images moved from the official train set to validation.
        classes: Names or indices of the classes to keep in train and validation; ``None``
            or ``"all"`` keeps all.
        test_classes: The same for the test split; ``None`` keeps the classes of ``classes``.
        seed: Seed of the per-epoch shuffle (the run's seed).
        num_workers: DataLoader worker processes.
        name: Plain config key; checked against the dataset, otherwise unused.
        input_shape: Plain config key ``[C, H, W]``; checked, otherwise unused.
        num_classes: Plain config key; checked, otherwise unused.
        class_names: Plain config key; checked, otherwise unused.
        split_seed: Seed of the train/val split, the same for every stage and run of a study.

    Attributes:
        input_shape: ``[C, H, W]``.
        num_classes: Always the full class count (10): heads keep their size under subsets.
        class_names: All class names, indexed by label.
        train_class_indices: The labels kept in train and validation, ascending.
        test_class_indices: The labels kept in the test split, ascending.
        class_indices: The labels that test results (``per_class_acc``) report: the test
            split's, equal to ``train_class_indices`` unless ``test_classes`` is given.
    """

    spec: ClassVar[DatasetSpec]
    augment: bool = False

    def __init__(
        self,
        root: str | Path | None = None,
        download: bool = False,
        cache_dir: str | Path | None = None,
        batch_size: int = 1024,
        eval_batch_size: int | None = None,
        val_size: int = 5000,
        classes: ClassSelection = None,
        seed: int = 0,
        num_workers: int = 0,
        test_classes: ClassSelection = None,
        name: str | None = None,
        input_shape: Sequence[int] | None = None,
        num_classes: int | None = None,
        class_names: Sequence[str] | None = None,
        split_seed: int = 0,
    ) -> None:
        self.name = self.spec.name
        super().__init__(batch_size, eval_batch_size, seed, num_workers)
        self._check_int("val_size", val_size, minimum=0)
        self._check_int("split_seed", split_seed, minimum=0)
        self.split_seed = split_seed
        self.root = root
        self.download = bool(download)
        self.cache_dir = cache_dir
        self.val_size = val_size
        self.input_shape = list(self.spec.input_shape)
        self.num_classes = len(self.spec.class_names)
        self.class_names = list(self.spec.class_names)
        self.train_class_indices = self._select(classes)
        self.test_class_indices = (
            self.train_class_indices
            if test_classes is None
            else self._select(test_classes, "test_")
        )
        self._check_plain_keys(
            name, input_shape=input_shape, num_classes=num_classes, class_names=class_names
        )
        # Plain types only: checkpoints store these and load with torch.load(weights_only=True),
        # which rejects Path and OmegaConf containers.
        self.save_hyperparameters(
            {
                "root": None if root is None else str(root),
                "download": self.download,
                "cache_dir": None if cache_dir is None else str(cache_dir),
                "batch_size": batch_size,
                "eval_batch_size": eval_batch_size,
                "val_size": val_size,
                "classes": None if classes is None else self.train_class_indices,
                "test_classes": None if test_classes is None else self.test_class_indices,
                "seed": self.seed,
                "split_seed": split_seed,
                "num_workers": num_workers,
                "augment": self.augment,
            }
        )
        self.decoded: DecodedDataset | None = None

    def _select(self, selection: ClassSelection, prefix: str = "") -> list[int]:
        """Labels of a class selection; ``"all"`` selects every class, as ``None`` does.

        Raises:
            DataError: on an unknown, out-of-range, repeated or empty selection.
        """
        if isinstance(selection, str) and selection.strip().lower() == "all":
            selection = None
        try:
            return list(resolve_classes(self.name, self.class_names, selection))
        except DataError as error:
            raise DataError(f"{error} (in {prefix}classes)" if prefix else str(error)) from None

    @property
    def class_indices(self) -> list[int]:
        """The labels test results report: the test split's (see ``test_classes``)."""
        return self.test_class_indices

    @property
    def selected_class_names(self) -> list[str]:
        """Names of the classes trained on (train and validation), in label order."""
        return [self.class_names[index] for index in self.train_class_indices]

    @property
    def source(self) -> str | None:
        """Folder the data was read from, once loaded."""
        return str(self.decoded.located.directory) if self.decoded is not None else None

    def fingerprint(self) -> dict[str, object]:
        """Describe the data files used: folder, kind of source, path/size/sha1 of each file."""
        decoded = self._load()
        return {
            "dataset": self.name,
            "source": str(decoded.located.directory),
            "source_kind": decoded.located.kind,
            "files": [
                {key: f[key] for key in ("path", "size", "sha1_first_mib")} for f in decoded.files
            ],
            "cache_key": decoded.key,
        }

    def _load(self) -> DecodedDataset:
        if self.decoded is None:
            self.decoded = load_dataset(self.spec, self.root, self.download, self.cache_dir)
            decoded = self.decoded
            how = {
                "decoded": "decoded, cache written to",
                "cache hit": "cache hit",
                "memory": "already in memory, cache",
            }[decoded.origin]
            said = (self.name, str(decoded.located.directory))
            if said in _ANNOUNCED:  # every run of a study loads the same files: say it once
                return self.decoded
            _ANNOUNCED.add(said)
            log.info(
                "%s: loaded from %s (%s %s)",
                self.name,
                decoded.located.directory,
                how,
                decoded.cache_path,
            )
        return self.decoded

    def check_source(self) -> None:
        """Check, without reading them, that the data files are where this config says.

        Raises:
            DataError: the files are not found (unless ``download=True`` may fetch them).
        """
        if not self.download:
            locate(self.spec, self.root, resolve_cache_dir(self.cache_dir), download=False)

    def prepare_data(self) -> None:
        """Download if allowed and needed, decode, and write the disk cache (once per node)."""
        load_dataset(self.spec, self.root, self.download, self.cache_dir)

    @staticmethod
    def _keep(labels: Tensor, classes: Sequence[int]) -> Tensor:
        """Boolean mask ``[N]`` of the ``labels [N]`` that are in ``classes``."""
        return torch.isin(labels, torch.tensor(classes, dtype=labels.dtype))

    def _subset(
        self, images: Tensor, labels: Tensor, index: Tensor, classes: Sequence[int], augment: bool
    ) -> BatchTensorDataset:
        """The images ``[N, ...]`` at ``index`` whose labels are in ``classes``, as a dataset."""
        index = index[self._keep(labels.index_select(0, index), classes)]
        transform = NormalizeImages(
            self.spec.mean, self.spec.std, augment=RandomCropFlip(padding=4) if augment else None
        )
        return BatchTensorDataset(
            images.index_select(0, index), labels.index_select(0, index), transform
        )

    def setup(self, stage: str | None = None) -> None:
        """Build the train/val/test datasets (all at once: a split costs one index_select).

        Raises:
            DataError: when the files are missing or corrupt, ``val_size`` is too large, or
                the class selection leaves no training images.
        """
        if self.train_dataset is not None:
            return
        decoded = self._load()
        total = len(decoded.train_y)
        if self.val_size >= total:
            raise DataError(
                f"{self.name}: val_size={self.val_size} leaves no training images "
                f"(the training set has {total})"
            )
        order = torch.randperm(total, generator=torch.Generator().manual_seed(self.split_seed))
        # Sorted so a split is a set: the same seed gives byte-identical tensors.
        val_index = order[: self.val_size].sort().values
        train_index = order[self.val_size :].sort().values
        trained = self.train_class_indices
        self.train_dataset = self._subset(
            decoded.train_x, decoded.train_y, train_index, trained, self.augment
        )
        self.val_dataset = self._subset(decoded.train_x, decoded.train_y, val_index, trained, False)
        self.test_dataset = self._subset(
            decoded.test_x,
            decoded.test_y,
            torch.arange(len(decoded.test_y)),
            self.test_class_indices,
            False,
        )
        if len(self.train_dataset) == 0:
            raise DataError(
                f"{self.name}: classes {self.selected_class_names} have no training "
                f"images in {decoded.located.directory}"
            )


class FashionMNISTDataModule(VisionDataModule):
    """Fashion-MNIST (Zalando): 60000 + 10000 grey 28×28 images of 10 clothing classes."""

    spec = FASHION_MNIST


class MNISTDataModule(VisionDataModule):
    """MNIST: 60000 + 10000 grey 28×28 handwritten digits."""

    spec = MNIST


class CIFAR10DataModule(VisionDataModule):
    """CIFAR-10: 50000 + 10000 colour 32×32 images of 10 classes.

    Takes the arguments of :class:`VisionDataModule` plus ``augment``.

    Args:
        augment: Random crop (zero padding 4) and horizontal flip, drawn per image, on
            training batches only.
    """

    spec = CIFAR10

    def __init__(
        self,
        root: str | Path | None = None,
        download: bool = False,
        cache_dir: str | Path | None = None,
        batch_size: int = 1024,
        eval_batch_size: int | None = None,
        val_size: int = 5000,
        classes: ClassSelection = None,
        seed: int = 0,
        num_workers: int = 0,
        augment: bool = False,
        test_classes: ClassSelection = None,
        name: str | None = None,
        input_shape: Sequence[int] | None = None,
        num_classes: int | None = None,
        class_names: Sequence[str] | None = None,
        split_seed: int = 0,
    ) -> None:
        self.augment = bool(augment)
        super().__init__(
            root,
            download,
            cache_dir,
            batch_size,
            eval_batch_size,
            val_size,
            classes,
            seed,
            num_workers,
            test_classes,
            name,
            input_shape,
            num_classes,
            class_names,
            split_seed,
        )
