"""Image DataModules on real-format files: splits, subsets, batches, arguments."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lora_lab.data import (
    CIFAR10DataModule,
    DataError,
    FashionMNISTDataModule,
    MNISTDataModule,
    make_datamodule,
)


def test_sizes_dtypes_and_normalisation(mnist_root: Path) -> None:
    dm = MNISTDataModule(root=mnist_root, val_size=100, batch_size=64)
    dm.setup("fit")
    assert (
        dm.train_dataset is not None and dm.val_dataset is not None and dm.test_dataset is not None
    )
    assert (len(dm.train_dataset), len(dm.val_dataset), len(dm.test_dataset)) == (500, 100, 100)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (64, 1, 28, 28) and x.dtype == torch.float32
    assert y.shape == (64,) and y.dtype == torch.int64
    # Pixel 0 and 255 map to (0 - mean) / std and (1 - mean) / std.
    mean, std = dm.spec.mean[0], dm.spec.std[0]
    assert x.min() >= -mean / std - 1e-5 and x.max() <= (1 - mean) / std + 1e-5
    raw = dm.train_dataset.inputs[:5].float() / 255
    assert torch.allclose(
        dm.train_dataset.__getitems__([0, 1, 2, 3, 4])[0], (raw - mean) / std, atol=1e-6
    )


def test_loaders_cover_each_split_once(mnist_root: Path) -> None:
    dm = MNISTDataModule(root=mnist_root, val_size=100, batch_size=128, eval_batch_size=60)
    dm.setup("fit")
    train_batches = list(dm.train_dataloader())
    assert [len(y) for _, y in train_batches] == [128, 128, 128, 116]
    assert dm.train_dataset is not None
    seen = torch.cat([y for _, y in train_batches]).sort().values
    assert torch.equal(seen, dm.train_dataset.targets.sort().values)
    val_batches = list(dm.val_dataloader())
    assert [len(y) for _, y in val_batches] == [60, 40]
    assert dm.val_dataset is not None
    assert torch.equal(torch.cat([y for _, y in val_batches]), dm.val_dataset.targets)  # in order
    assert sum(len(y) for _, y in dm.test_dataloader()) == 100


def test_split_is_deterministic_in_split_seed_and_disjoint(mnist_root: Path) -> None:
    def split(split_seed: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        dm = MNISTDataModule(root=mnist_root, val_size=100, seed=seed, split_seed=split_seed)
        dm.setup("fit")
        assert dm.train_dataset is not None and dm.val_dataset is not None
        return dm.train_dataset.inputs, dm.val_dataset.inputs

    train_a, val_a = split(0)
    train_b, val_b = split(0, seed=3)  # the run's seed orders batches, it does not split
    _, val_c = split(1)
    assert torch.equal(train_a, train_b) and torch.equal(val_a, val_b)
    assert not torch.equal(val_a, val_c)
    # Fake images are random, so rows identify images: val and train never share one.
    train_rows = {row.tobytes() for row in train_a.flatten(1).numpy()}
    assert not any(row.tobytes() in train_rows for row in val_a.flatten(1).numpy())


def test_class_subset_keeps_original_labels(mnist_root: Path) -> None:
    dm = MNISTDataModule(root=mnist_root, val_size=100, classes=["seven", 2, "5"])
    dm.setup("fit")
    assert dm.class_indices == [2, 5, 7]
    assert dm.num_classes == 10 and len(dm.class_names) == 10
    assert dm.selected_class_names == ["two", "five", "seven"]
    for dataset in (dm.train_dataset, dm.val_dataset, dm.test_dataset):
        assert dataset is not None and len(dataset) > 0
        assert set(dataset.targets.unique().tolist()) == {2, 5, 7}
    full = MNISTDataModule(root=mnist_root, val_size=100)
    full.setup("fit")
    assert full.test_dataset is not None and dm.test_dataset is not None
    expected = full.test_dataset.targets[
        torch.isin(full.test_dataset.targets, torch.tensor([2, 5, 7]))
    ]
    assert torch.equal(dm.test_dataset.targets, expected)


def test_cifar_class_names_and_indices_mixed(cifar_root: Path) -> None:
    dm = CIFAR10DataModule(root=cifar_root, val_size=20, classes=["cat", "bird", 5])
    assert dm.class_indices == [2, 3, 5]
    assert FashionMNISTDataModule(classes=["t-shirt/top", "ankle_boot", "BAG"]).class_indices == [
        0,
        8,
        9,
    ]


@pytest.mark.parametrize(
    ("classes", "message"),
    [
        ([], r"classes=\[\] selects no class"),
        (
            ["cat", "unicorn"],
            r"names unknown class 'unicorn'; valid names: airplane, automobile, bird",
        ),
        ([3, "cat"], r"class 'cat' \(cat, index 3\) selected twice"),
        ([1, 1], r"selected twice"),
        ([10], r"holds index 10, out of range 0\.\.9"),
        ([-1], r"holds index -1, out of range"),
        ([True], r"neither a class name nor an index"),
    ],
)
def test_bad_class_selections(classes: list[object], message: str) -> None:
    with pytest.raises(DataError, match=message) as info:
        CIFAR10DataModule(classes=classes)  # type: ignore[arg-type]
    assert "\n" not in str(info.value)


def test_unknown_dataset_lists_valid_names() -> None:
    with pytest.raises(
        DataError,
        match=r"unknown dataset 'imagenet'; valid names: fashion_mnist, mnist, "
        r"cifar10, linear_shift",
    ):
        make_datamodule("imagenet")
    assert isinstance(make_datamodule("mnist", batch_size=8), MNISTDataModule)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": "mnist"}, r"config name='mnist' does not match datamodule 'fashion_mnist'"),
        ({"input_shape": [3, 32, 32]}, r"input_shape=\[3, 32, 32\] does not match"),
        ({"num_classes": 100}, r"num_classes=100 does not match"),
        ({"class_names": ["a"] * 10}, r"class_names=.* does not match"),
        ({"batch_size": 0}, r"batch_size=0 must be an integer >= 1"),
        ({"val_size": -1}, r"val_size=-1 must be an integer >= 0"),
    ],
)
def test_bad_arguments(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(DataError, match=message):
        FashionMNISTDataModule(**kwargs)  # type: ignore[arg-type]


def test_val_size_too_large(mnist_root: Path) -> None:
    with pytest.raises(
        DataError, match=r"val_size=600 leaves no training images \(the training set has 600\)"
    ):
        MNISTDataModule(root=mnist_root, val_size=600).setup("fit")


def test_cifar_batches_and_augment_keep_shapes(cifar_root: Path) -> None:
    plain = CIFAR10DataModule(root=cifar_root, val_size=50, batch_size=32)
    augmented = CIFAR10DataModule(root=cifar_root, val_size=50, batch_size=32, augment=True)
    plain.setup("fit")
    augmented.setup("fit")
    x, y = next(iter(augmented.train_dataloader()))
    assert x.shape == (32, 3, 32, 32) and x.dtype == torch.float32 and y.shape == (32,)
    assert plain.train_dataset is not None and augmented.train_dataset is not None
    index = list(range(32))
    torch.manual_seed(0)
    x_aug, _ = augmented.train_dataset.__getitems__(index)
    x_plain, _ = plain.train_dataset.__getitems__(index)
    assert not torch.equal(x_aug, x_plain)
    # Validation and test are never augmented.
    assert augmented.val_dataset is not None and plain.val_dataset is not None
    assert torch.equal(
        augmented.val_dataset.__getitems__(index)[0], plain.val_dataset.__getitems__(index)[0]
    )


def test_real_debian_fashion_mnist(real_fashion_mnist: Path) -> None:
    dm = FashionMNISTDataModule()
    dm.setup("fit")
    assert dm.source == str(real_fashion_mnist)
    assert dm.decoded is not None
    assert (len(dm.decoded.train_y), len(dm.decoded.test_y)) == (60000, 10000)
    assert (
        dm.train_dataset is not None and dm.val_dataset is not None and dm.test_dataset is not None
    )
    assert (len(dm.train_dataset), len(dm.val_dataset), len(dm.test_dataset)) == (
        55000,
        5000,
        10000,
    )
    assert torch.bincount(dm.decoded.test_y).tolist() == [1000] * 10
    x, _ = dm.val_dataset.__getitems__(list(range(5000)))
    assert abs(float(x.mean())) < 0.05 and abs(float(x.std()) - 1) < 0.05  # the standard mean/std
