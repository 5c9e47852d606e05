"""The DataModule base shared by image datasets and the synthetic task: loaders and checks."""

from __future__ import annotations

from collections.abc import Sequence

import lightning as L
from torch.utils.data import DataLoader

from lora_lab.data.errors import DataError
from lora_lab.data.loader import Batch, BatchTensorDataset, EpochShuffleSampler, make_loader


class BatchedDataModule(L.LightningDataModule):
    """Serves train/val/test ``BatchTensorDataset``s through batch-at-a-time loaders.

    Subclasses fill ``train_dataset``, ``val_dataset`` and ``test_dataset`` in ``setup``.

    Args:
        batch_size: Training batch size.
        eval_batch_size: Validation/test batch size; defaults to ``batch_size``.
        seed: Seed of the per-epoch training shuffle (see ``EpochShuffleSampler``).
        num_workers: DataLoader worker processes (0: batches are built in-process, which is
            fastest here because a batch costs one ``index_select``).
    """

    name: str = ""

    def __init__(
        self,
        batch_size: int = 1024,
        eval_batch_size: int | None = None,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        self._check_int("batch_size", batch_size, minimum=1)
        if eval_batch_size is not None:
            self._check_int("eval_batch_size", eval_batch_size, minimum=1)
        self._check_int("num_workers", num_workers, minimum=0)
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size if eval_batch_size is not None else batch_size
        self.seed = int(seed)
        self.num_workers = num_workers
        self.train_dataset: BatchTensorDataset | None = None
        self.val_dataset: BatchTensorDataset | None = None
        self.test_dataset: BatchTensorDataset | None = None

    def _check_int(self, arg: str, value: object, minimum: int) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise DataError(f"{self.name}: {arg}={value!r} must be an integer >= {minimum}")

    def _check_plain_keys(self, name: str | None, **declared: object) -> None:
        """Check the plain keys that data configs carry for interpolation.

        Configs repeat facts such as ``input_shape`` so model configs can read them; they
        reach ``__init__`` through ``hydra.utils.instantiate``, and a mismatch (say a model
        config copied from another dataset) is better caught here than as a shape error.
        """
        if name is not None and name != self.name:
            raise DataError(f"config name={name!r} does not match datamodule {self.name!r}")
        for key, value in declared.items():
            if value is None:
                continue
            actual = getattr(self, key)
            as_list = (
                list(value) if isinstance(value, Sequence) and not isinstance(value, str) else value
            )
            if as_list != (list(actual) if isinstance(actual, Sequence) else actual):
                raise DataError(
                    f"{self.name}: config {key}={as_list!r} does not match the data ({actual!r})"
                )

    def check_source(self) -> None:
        """Check, before any training, that the data can be had (a no-op for synthetic data)."""

    def _require(self, split: str) -> BatchTensorDataset:
        dataset = getattr(self, f"{split}_dataset")
        if dataset is None:
            self.setup("fit" if split in ("train", "val") else "test")
            dataset = getattr(self, f"{split}_dataset")
        assert dataset is not None
        return dataset

    def train_dataloader(self) -> DataLoader[Batch]:
        """Shuffled training batches ``(x [B, ...], y [B, ...])``, order fixed by (seed, epoch)."""
        dataset = self._require("train")
        sampler = EpochShuffleSampler(len(dataset), seed=self.seed)
        return make_loader(dataset, self.batch_size, sampler=sampler, num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader[Batch]:
        """Validation batches in a fixed order."""
        return make_loader(
            self._require("val"), self.eval_batch_size, sampler=None, num_workers=self.num_workers
        )

    def test_dataloader(self) -> DataLoader[Batch]:
        """Test batches in a fixed order."""
        return make_loader(
            self._require("test"), self.eval_batch_size, sampler=None, num_workers=self.num_workers
        )

    def predict_dataloader(self) -> DataLoader[Batch]:
        """The test batches, for ``Trainer.predict``."""
        return self.test_dataloader()
