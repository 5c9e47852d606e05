"""Task modules: classification and regression are siblings under `TaskModule`, each trains
through the shared steps, and their LoRA variants (alone or fused) keep the task's metrics."""

from __future__ import annotations

import copy
import functools

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lora_lab.lora import LoRAConfig
from lora_lab.models import (
    ClassifierModule,
    LoRAClassifierModule,
    LoRARegressionModule,
    RegressionModule,
    TaskModule,
    lora_variant,
)
from lora_lab.models.fused import FusedLoRAModule

ADAM = functools.partial(torch.optim.Adam, lr=1e-2)


def loader(target: torch.Tensor) -> DataLoader:
    """Eight examples of 4 features with the given targets `[8, ...]`, in one batch."""
    generator = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(8, 4, generator=generator), target), batch_size=8)


def one_step(module: L.LightningModule, data: DataLoader) -> L.Trainer:
    """Fit one training step (and the epoch's validation) on CPU, writing nothing."""
    trainer = L.Trainer(
        max_steps=1,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, train_dataloaders=data, val_dataloaders=data)
    return trainer


def test_classification_and_regression_are_sibling_task_modules():
    assert issubclass(ClassifierModule, TaskModule) and issubclass(RegressionModule, TaskModule)
    assert not issubclass(RegressionModule, ClassifierModule)
    assert not issubclass(LoRARegressionModule, ClassifierModule)
    assert lora_variant(RegressionModule) is LoRARegressionModule
    assert issubclass(LoRARegressionModule, RegressionModule)
    with pytest.raises(TypeError):  # the loss is the task's: no task, no module
        TaskModule(network=nn.Linear(4, 2), optimizer=ADAM)  # type: ignore[abstract]


@pytest.mark.parametrize(
    ("module_class", "target", "has_accuracy"),
    [
        (ClassifierModule, torch.tensor([0, 1] * 4), True),
        (RegressionModule, torch.zeros(8, 2), False),
    ],
)
def test_a_task_module_trains_one_step(
    module_class: type[TaskModule], target: torch.Tensor, has_accuracy: bool
):
    network = nn.Linear(4, 2)
    before = network.weight.detach().clone()
    kwargs = {"num_classes": 2} if module_class is ClassifierModule else {}
    module = module_class(network=network, optimizer=ADAM, **kwargs)
    trainer = one_step(module, loader(target))
    assert trainer.global_step == 1
    assert not torch.equal(network.weight, before)
    assert torch.isfinite(trainer.callback_metrics["train_loss"])
    assert torch.isfinite(trainer.callback_metrics["val_loss"])
    assert ("train_acc" in trainer.callback_metrics) is has_accuracy
    assert ("val_acc" in trainer.callback_metrics) is has_accuracy
    assert module_class.has_accuracy is has_accuracy


def test_fused_regression_members_train_and_test_without_accuracy():
    # The fused module takes the task's rules from its members: no accuracy, no class counts.
    network = nn.Sequential(nn.Linear(4, 2))
    members = [
        LoRARegressionModule(
            network=copy.deepcopy(network), lora=LoRAConfig(rank=1, alpha=1), optimizer=ADAM
        )
        for _ in range(2)
    ]
    fused = FusedLoRAModule(members)
    data = loader(torch.zeros(8, 2))
    trainer = one_step(fused, data)
    trainer.test(fused, dataloaders=data, verbose=False)
    assert set(fused.test_metrics) == {0, 1}
    assert all(set(metrics) == {"test_loss"} for metrics in fused.test_metrics.values())
    assert all(member.per_class_test_acc is None for member in members)


def test_fused_classifier_members_count_correct_per_member():
    network = nn.Sequential(nn.Linear(4, 3))
    members = [
        LoRAClassifierModule(
            network=copy.deepcopy(network),
            lora=LoRAConfig(rank=1, alpha=1),
            optimizer=ADAM,
            num_classes=3,
        )
        for _ in range(2)
    ]
    fused = FusedLoRAModule(members)
    data = loader(torch.tensor([0, 1, 2, 0, 1, 2, 0, 1]))
    trainer = one_step(fused, data)
    trainer.test(fused, dataloaders=data, verbose=False)
    assert all(set(m) == {"test_loss", "test_acc"} for m in fused.test_metrics.values())
    assert all(member.per_class_test_acc.shape == (3,) for member in members)
    features, target = next(iter(data))
    for k, member in enumerate(members):  # each member's count is its own, as if alone
        with torch.no_grad():
            predicted = member.network(features).argmax(-1)
            alone = (predicted == target).float().mean().item()
        assert fused.test_metrics[k]["test_acc"] == pytest.approx(alone)
        # its confusion matrix too: row = true class, column = predicted, as counted alone
        expected = torch.zeros(3, 3, dtype=torch.long)
        expected.index_put_((target, predicted), torch.ones_like(target), accumulate=True)
        assert torch.equal(member.test_confusion, expected)


class GoesNonFinite(RegressionModule):
    """A regression whose loss is NaN from batch `bad_batch` of epoch 1 on."""

    bad_batch = 3

    def training_step(self, batch, batch_idx):  # type: ignore[override]
        self.batches_trained = batch_idx + 1
        return super().training_step(batch, batch_idx)

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        loss = super().loss(output, target)
        late = self.trainer.training and self.current_epoch == 1
        if late and self.trainer.fit_loop.epoch_loop.batch_idx >= self.bad_batch:
            return loss * float("nan")
        return loss


@pytest.mark.parametrize(("check_every", "stops_after"), [(2, 4), (50, 10)])
def test_a_non_finite_loss_stops_the_run_naming_its_epoch_and_batch(check_every, stops_after):
    """The step does not read the device: the flag is read every `finite_check_every` batches
    (and before validation), so the run stops at the first read after the bad batch, and the
    error still names where the loss first went non-finite."""
    module = GoesNonFinite(network=nn.Linear(4, 2), optimizer=ADAM)
    module.finite_check_every = check_every
    generator = torch.Generator().manual_seed(0)
    data = DataLoader(
        TensorDataset(torch.randn(40, 4, generator=generator), torch.zeros(40, 2)), batch_size=4
    )
    trainer = L.Trainer(
        max_epochs=3, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    with pytest.raises(FloatingPointError, match="training loss is nan at epoch 1 batch 3;"):
        trainer.fit(module, train_dataloaders=data, val_dataloaders=data)
    assert module.batches_trained == stops_after
