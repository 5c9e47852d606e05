"""`test_classes`: train and validate on some classes, test on others (labels keep indices)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from lora_lab.config_path import config_dir
from lora_lab.data import CIFAR10DataModule, DataError, FashionMNISTDataModule, MNISTDataModule
from lora_lab.pipeline import record
from lora_lab.pipeline.run_config import stage_config

CONF_DIR = config_dir()
TOPS = ["Shirt", "Pullover", "Coat"]


def labels(dataset: object) -> set[int]:
    assert dataset is not None
    return set(dataset.targets.unique().tolist())  # type: ignore[attr-defined]


def test_train_and_val_use_classes_test_uses_test_classes(mnist_root: Path) -> None:
    dm = MNISTDataModule(root=mnist_root, val_size=100, classes=[2, 5, 7], test_classes="all")
    dm.setup("fit")
    assert labels(dm.train_dataset) == labels(dm.val_dataset) == {2, 5, 7}
    assert labels(dm.test_dataset) == set(range(10))
    assert dm.train_class_indices == [2, 5, 7] and dm.selected_class_names == [
        "two",
        "five",
        "seven",
    ]
    # What per-class test results report: the test split's classes.
    assert dm.test_class_indices == dm.class_indices == list(range(10))
    assert dm.hparams["classes"] == [2, 5, 7] and dm.hparams["test_classes"] == list(range(10))


def test_test_classes_null_keeps_the_training_classes(mnist_root: Path) -> None:
    dm = MNISTDataModule(root=mnist_root, val_size=100, classes=["seven", 2])
    dm.setup("test")
    assert dm.class_indices == dm.test_class_indices == dm.train_class_indices == [2, 7]
    assert labels(dm.test_dataset) == {2, 7}
    assert dm.hparams["test_classes"] is None


def test_test_classes_may_be_any_other_selection(mnist_root: Path) -> None:
    dm = FashionMNISTDataModule(root=mnist_root, val_size=100, classes=TOPS, test_classes=[0, 9])
    dm.setup("fit")
    assert dm.train_class_indices == [2, 4, 6] and labels(dm.train_dataset) == {2, 4, 6}
    assert dm.class_indices == [0, 9] and labels(dm.test_dataset) == {0, 9}
    full = FashionMNISTDataModule(root=mnist_root, val_size=100)
    full.setup("fit")
    assert full.test_dataset is not None and dm.test_dataset is not None
    keep = torch.isin(full.test_dataset.targets, torch.tensor([0, 9]))
    assert torch.equal(dm.test_dataset.targets, full.test_dataset.targets[keep])


def test_all_selects_every_class_and_cifar_takes_test_classes(cifar_root: Path) -> None:
    assert CIFAR10DataModule(classes="all").train_class_indices == list(range(10))
    dm = CIFAR10DataModule(root=cifar_root, val_size=20, classes=["cat"], test_classes=" ALL ")
    assert dm.train_class_indices == [3] and dm.class_indices == list(range(10))


def test_bad_test_classes_are_one_line_errors_naming_the_key() -> None:
    with pytest.raises(DataError, match=r"unknown class 'Jacket'.*\(in test_classes\)$") as info:
        FashionMNISTDataModule(classes=TOPS, test_classes=["Jacket"])
    assert "\n" not in str(info.value)


def test_per_class_results_cover_the_test_classes() -> None:
    """The pipeline's per_class_acc reports every tested class, not only the trained ones."""
    dm = FashionMNISTDataModule(classes=TOPS, test_classes="all")
    confusion = torch.arange(100).reshape(10, 10)
    module = SimpleNamespace(
        per_class_test_acc=torch.linspace(0, 0.9, 10), test_confusion=confusion
    )
    fields = record.tested_fields({"test_loss": 1.0, "test_acc": 0.5}, module, dm)  # type: ignore[arg-type]
    assert list(fields["per_class_acc"]) == dm.class_names
    assert fields["per_class_acc"]["Ankle boot"] == pytest.approx(0.9)
    # the confusion matrix too: a row per tested class, a column per class the network predicts
    assert fields["confusion"]["predicted"] == dm.class_names
    assert list(fields["confusion"]["counts"]) == dm.class_names
    assert fields["confusion"]["counts"]["Dress"] == list(range(30, 40))
    # what the run trained on comes from its own data, not the tested classes
    assert record.trained_fields(module, dm)["train_classes"] == ["Pullover", "Coat", "Shirt"]  # type: ignore[arg-type]


def test_the_convnet_study_trains_on_three_tops_and_tests_on_all_ten() -> None:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["experiment=fashion_mnist_convnet_classes"])
    pretrain = instantiate(stage_config(cfg, "pretrain").data)
    assert pretrain.train_class_indices == pretrain.class_indices == list(range(10))
    for stage in ("full_finetune", "lora"):
        dm = instantiate(stage_config(cfg, stage).data)
        assert dm.selected_class_names == ["Pullover", "Coat", "Shirt"]
        assert dm.class_indices == list(range(10))
