"""The training-time fast path: whole batches cut from in-memory tensors.

A ``DataLoader`` normally fetches one item at a time and collates them; here the dataset's
``__getitems__`` receives the batch's indices and returns the finished batch with one
``index_select`` and a few tensor ops, and ``collate_batch`` passes it through. It is still a
plain ``torch.utils.data.DataLoader``, so Lightning can swap its sampler for a
``DistributedSampler`` under DDP and batching keeps working.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

Batch = tuple[Tensor, Tensor]
BatchTransform = Callable[[Tensor], Tensor]


@contextmanager
def _single_threaded() -> Iterator[None]:
    """Run torch ops on one intra-op thread, then restore the previous count.

    A batch is ~1-3 MB of memory-bound work: splitting it over threads gains nothing, and
    on two cores shared with other processes every parallel op waits at a thread-pool
    barrier. Measured there: 0.02-0.03 s per Fashion-MNIST epoch single-threaded against
    0.4-2 s with two threads. DataLoader workers already run single-threaded for the same
    reason. Switching costs well under a microsecond.
    """
    threads = torch.get_num_threads()
    if threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class BatchTensorDataset(Dataset[Batch]):
    """Map-style dataset over tensors that serves whole batches.

    Args:
        inputs: ``[N, ...]``, e.g. uint8 images ``[N, C, H, W]`` or float features ``[N, D]``.
        targets: ``[N]`` int64 labels or ``[N, D_out]`` float regression targets.
        transform: Applied to each batch of inputs (``[B, ...]`` in, float ``[B, ...]`` out).
    """

    def __init__(
        self, inputs: Tensor, targets: Tensor, transform: BatchTransform | None = None
    ) -> None:
        if len(inputs) != len(targets):
            raise ValueError(f"{len(inputs)} inputs but {len(targets)} targets")
        self.inputs = inputs
        self.targets = targets
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitems__(self, indices: Sequence[int]) -> Batch:
        """Return the batch ``(x [B, ...], y [B, ...])`` for ``indices`` (length B)."""
        with _single_threaded():
            index = torch.as_tensor(indices, dtype=torch.int64)
            inputs = self.inputs.index_select(0, index)
            if self.transform is not None:
                inputs = self.transform(inputs)
            return inputs, self.targets.index_select(0, index)

    def __getitem__(self, index: int) -> Batch:
        """One sample ``(x [...], y [])``; only for inspection, training uses batches."""
        inputs, targets = self.__getitems__([index])
        return inputs[0], targets[0]


def collate_batch(batch: Batch) -> Batch:
    """Pass an already-built batch through (module level so worker processes can pickle it)."""
    return batch


def derive_seed(seed: int, stream: int) -> int:
    """A well-mixed 63-bit seed that is a pure function of ``(seed, stream)``.

    Adjacent inputs (epoch 3 vs 4, seed 0 vs 1) give unrelated generators, which a plain
    ``seed + epoch`` would not: seed 0 at epoch 1 would replay seed 1 at epoch 0.
    """
    return int(np.random.SeedSequence([seed, stream]).generate_state(1, dtype=np.uint64)[0] >> 1)


class EpochShuffleSampler(Sampler[int]):
    """Shuffles ``range(num_samples)`` in an order fixed by ``(seed, epoch)`` alone.

    Lightning calls ``set_epoch`` on the train sampler before every epoch (and forwards it
    through ``DistributedSamplerWrapper`` under DDP), so a run resumed from a checkpoint at
    epoch k sees exactly the order an uninterrupted run sees at epoch k.

    Args:
        num_samples: Size of the dataset.
        seed: Base seed of the shuffle.
    """

    def __init__(self, num_samples: int, seed: int = 0) -> None:
        self.num_samples = num_samples
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the order of epoch ``epoch``."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(derive_seed(self.seed, self.epoch))
        return iter(torch.randperm(self.num_samples, generator=generator).tolist())

    def __len__(self) -> int:
        return self.num_samples


class NormalizeImages:
    """uint8 ``[B, C, H, W]`` → float32 ``(x / 255 - mean) / std``, per channel.

    Same result as torchvision's ``to_dtype(scale=True)`` + ``normalize`` (to 1e-6), folded
    into one scale and one shift per channel.

    Args:
        mean: Per-channel mean in [0, 1].
        std: Per-channel standard deviation in [0, 1].
        augment: Optional uint8 → uint8 batch augmentation run before normalising.
    """

    def __init__(
        self, mean: Sequence[float], std: Sequence[float], augment: BatchTransform | None = None
    ) -> None:
        std_tensor = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
        self.scale = 1.0 / (255.0 * std_tensor)  # [C, 1, 1]
        self.shift = -torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1) / std_tensor
        self.augment = augment

    def __call__(self, images: Tensor) -> Tensor:
        if self.augment is not None:
            images = self.augment(images)
        return images.float().mul_(self.scale).add_(self.shift)


class RandomCropFlip:
    """Per-image random crop after zero padding, plus a random horizontal flip.

    torchvision's ``RandomCrop``/``RandomHorizontalFlip`` draw one crop and one coin for a
    whole batch tensor; this draws them per image with gather-style indexing, keeping the
    batch path free of per-item Python. Randomness comes from torch's global generator,
    which Lightning's ``seed_everything`` (and its per-worker seeding) controls.

    Args:
        padding: Pixels of zero padding on each side (4 for CIFAR).
    """

    def __init__(self, padding: int = 4) -> None:
        self.padding = padding

    def __call__(self, images: Tensor) -> Tensor:
        """Augment uint8 ``[B, C, H, W]``; returns the same shape and dtype."""
        batch, _, height, width = images.shape
        pad = self.padding
        padded = torch.nn.functional.pad(images, (pad, pad, pad, pad))
        top = torch.randint(0, 2 * pad + 1, (batch, 1), device=images.device)
        left = torch.randint(0, 2 * pad + 1, (batch, 1), device=images.device)
        rows = top + torch.arange(height, device=images.device)  # [B, H]
        cols = left + torch.arange(width, device=images.device)  # [B, W]
        flip = torch.rand(batch, 1, device=images.device) < 0.5
        # Flipping = reading columns right to left, folded into the same gather.
        cols = torch.where(flip, cols.flip(1), cols)
        sample = torch.arange(batch, device=images.device)[:, None, None]
        # Advanced indices split by a slice move to the front: result is [B, H, W, C].
        cropped = padded[sample, :, rows[:, :, None], cols[:, None, :]]
        return cropped.permute(0, 3, 1, 2).contiguous()


def make_loader(
    dataset: BatchTensorDataset, batch_size: int, *, sampler: Sampler[int] | None, num_workers: int
) -> DataLoader[Batch]:
    """A ``DataLoader`` that asks ``dataset`` for whole batches.

    Args:
        dataset: The batched dataset.
        batch_size: Batch size B.
        sampler: Index order; ``None`` for the dataset's order (validation and test).
        num_workers: Worker processes; 0 builds batches in the training process.

    Returns:
        A loader yielding ``(x [B, ...], y [B, ...])`` with a final partial batch.
    """
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        shuffle=False,
        collate_fn=collate_batch,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
    )
