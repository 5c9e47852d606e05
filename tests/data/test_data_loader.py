"""The batched loader: sampler order, DDP samplers, workers, augmentation, Lightning's use."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.fabric.utilities.distributed import DistributedSamplerWrapper
from lightning.pytorch.utilities.data import _update_dataloader
from torch import nn
from torch.utils.data import DistributedSampler

from lora_lab.data import (
    BatchTensorDataset,
    EpochShuffleSampler,
    MNISTDataModule,
    RandomCropFlip,
    collate_batch,
)
from lora_lab.data.loader import make_loader


def _order(seed: int, epoch: int, n: int = 100) -> list[int]:
    sampler = EpochShuffleSampler(n, seed=seed)
    sampler.set_epoch(epoch)
    return list(sampler)


def test_sampler_order_is_a_function_of_seed_and_epoch() -> None:
    assert _order(0, 0) == _order(0, 0)
    assert sorted(_order(0, 0)) == list(range(100))
    assert _order(0, 0) != _order(0, 1)
    assert _order(0, 0) != _order(1, 0)
    assert _order(0, 1) != _order(1, 0)  # not seed + epoch
    # A sampler that went through epochs 0..2 gives the same epoch-3 order as a fresh one
    # set straight to epoch 3 (a resumed run).
    lived = EpochShuffleSampler(100, seed=5)
    for epoch in range(3):
        lived.set_epoch(epoch)
        list(lived)
    lived.set_epoch(3)
    assert list(lived) == _order(5, 3)
    assert list(lived) == list(lived)  # iterating does not advance anything


def _dataset(n: int = 50) -> BatchTensorDataset:
    return BatchTensorDataset(torch.arange(n, dtype=torch.float32)[:, None], torch.arange(n))


def test_getitems_builds_the_batch_and_collate_passes_it_through() -> None:
    dataset = _dataset()
    x, y = dataset.__getitems__([4, 2, 9])
    assert x.shape == (3, 1) and y.tolist() == [4, 2, 9]
    assert collate_batch((x, y)) == (x, y)
    assert dataset[7][1] == 7


def test_loader_batches_follow_the_sampler() -> None:
    dataset = _dataset()
    sampler = EpochShuffleSampler(len(dataset), seed=3)
    sampler.set_epoch(2)
    loader = make_loader(dataset, 16, sampler=sampler, num_workers=0)
    assert isinstance(loader, torch.utils.data.DataLoader)
    batches = [y for _, y in loader]
    assert [len(y) for y in batches] == [16, 16, 16, 2]
    assert torch.cat(batches).tolist() == _order(3, 2, n=50)


def test_workers_give_the_same_batches() -> None:
    dataset = _dataset()
    in_process = [
        y for _, y in make_loader(dataset, 16, sampler=EpochShuffleSampler(50, 1), num_workers=0)
    ]
    workers = [
        y for _, y in make_loader(dataset, 16, sampler=EpochShuffleSampler(50, 1), num_workers=1)
    ]
    assert all(torch.equal(a, b) for a, b in zip(in_process, workers, strict=True))


def test_distributed_sampler_still_batches() -> None:
    dataset = _dataset()
    loader = make_loader(dataset, 8, sampler=EpochShuffleSampler(50, seed=0), num_workers=0)
    # What Lightning does with use_distributed_sampler=True for a custom sampler ...
    wrapped = _update_dataloader(
        loader, DistributedSamplerWrapper(loader.sampler, num_replicas=2, rank=0)
    )
    wrapped.sampler.set_epoch(1)
    rank0 = torch.cat([y for _, y in wrapped])
    assert len(rank0) == 25 and wrapped.collate_fn is collate_batch
    assert set(rank0.tolist()) <= set(range(50))
    # ... and a plain DistributedSampler, constructed by hand.
    for rank in (0, 1):
        sampler = DistributedSampler(dataset, num_replicas=2, rank=rank, shuffle=True, seed=0)
        batches = list(make_loader(dataset, 8, sampler=sampler, num_workers=0))
        assert [len(y) for _, y in batches] == [8, 8, 8, 1]
        assert all(x.shape == (len(y), 1) for x, y in batches)


def test_random_crop_flip_is_a_per_image_crop_of_the_padded_image() -> None:
    torch.manual_seed(0)
    images = torch.randint(1, 256, (16, 3, 8, 8), dtype=torch.uint8)
    out = RandomCropFlip(padding=2)(images)
    assert out.shape == images.shape and out.dtype == torch.uint8
    padded = nn.functional.pad(images, (2, 2, 2, 2))
    crops_used = set()
    for i in range(16):
        candidates = {
            (top, left, flip)
            for top in range(5)
            for left in range(5)
            for flip in (False, True)
            if torch.equal(
                out[i],
                (lambda c: c.flip(-1) if flip else c)(padded[i, :, top : top + 8, left : left + 8]),
            )
        }
        assert candidates, f"image {i} is not a crop of its padded original"
        crops_used |= candidates
    assert len(crops_used) > 1  # drawn per image, not once per batch


class _RecordingModule(L.LightningModule):
    """Linear classifier that records the labels of every training batch, by epoch."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(28 * 28, 10)
        self.seen: dict[int, list[int]] = {}

    def training_step(
        self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int
    ) -> torch.Tensor:
        x, y = batch
        self.seen.setdefault(self.current_epoch, []).extend(y.tolist())
        return nn.functional.cross_entropy(self.layer(x.flatten(1)), y)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        pass  # never run (limit_val_batches=0); declared so Lightning does not warn

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _trainer(max_epochs: int, tmp_path: Path) -> L.Trainer:
    return L.Trainer(
        max_epochs=max_epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        default_root_dir=tmp_path,
        enable_checkpointing=False,
    )


def test_lightning_sets_the_epoch_and_a_resumed_run_sees_the_same_order(
    mnist_root: Path, tmp_path: Path
) -> None:
    def datamodule() -> MNISTDataModule:
        return MNISTDataModule(root=mnist_root, val_size=100, batch_size=128, seed=4)

    full = _RecordingModule()
    _trainer(3, tmp_path).fit(full, datamodule=datamodule())
    labels = datamodule()
    labels.setup("fit")
    assert labels.train_dataset is not None
    for epoch in range(3):
        expected = labels.train_dataset.targets[_order(4, epoch, n=500)].tolist()
        assert full.seen[epoch] == expected

    first = _RecordingModule()
    trainer = _trainer(2, tmp_path)
    trainer.fit(first, datamodule=datamodule())
    trainer.save_checkpoint(tmp_path / "epoch2.ckpt")
    resumed = _RecordingModule()
    _trainer(3, tmp_path).fit(resumed, datamodule=datamodule(), ckpt_path=tmp_path / "epoch2.ckpt")
    assert list(resumed.seen) == [2]
    assert resumed.seen[2] == full.seen[2]


@pytest.mark.parametrize("batch_size", [1, 7])
def test_tiny_batches(batch_size: int) -> None:
    batches = list(make_loader(_dataset(10), batch_size, sampler=None, num_workers=0))
    assert torch.cat([y for _, y in batches]).tolist() == list(range(10))


def test_normalize_matches_torchvision() -> None:
    from torchvision.transforms.v2 import functional as tvf

    from lora_lab.data import NormalizeImages

    images = torch.randint(0, 256, (4, 3, 5, 5), dtype=torch.uint8)
    mean, std = [0.4914, 0.4822, 0.4465], [0.2470, 0.2435, 0.2616]
    expected = tvf.normalize(tvf.to_dtype(images, torch.float32, scale=True), mean, std)
    out = NormalizeImages(mean, std)(images)
    assert out.dtype == torch.float32 and torch.allclose(out, expected, atol=1e-5)
