"""LightningModules: a base task module, classification and regression as its siblings, and
their LoRA subclasses.

`TaskModule` holds everything a task shares: the network, the optimizer and scheduler
partials, the training/validation/test steps, the epoch and checkpoint hooks. A task only says
what is its own: the loss, and whether (and how) it counts accuracy. The modules receive built
objects (a network, an optimizer partial, an optional scheduler partial) from Hydra, so nothing
here parses configuration. The LoRA subclasses reuse the task's forward and steps unchanged:
they only load the pretrained weights, call `inject_lora`, and hand the optimizer exactly the
parameters `inject_lora` left trainable.
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, ClassVar

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix

from lora_lab.lora import LoRAConfig, inject_lora, lora_parameter_groups, lora_parameters
from lora_lab.lora.params import full_rank_at
from lora_lab.models.run_state import restore_rng_state, save_rng_state, sum_dtype
from lora_lab.models.weights import load_network_weights

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], Any]


class TaskModule(L.LightningModule, ABC):
    """A network trained on one supervised task; subclasses give the loss and the metrics.

    Logs `train_loss`, `val_loss` and `test_loss` once per epoch (plus `<split>_acc` for a
    task with accuracy). A non-finite training loss raises `FloatingPointError` naming the
    epoch and batch where it first appeared. The training step never reads the device from
    the host: the check is a device-side flag, read every `finite_check_every` batches, before
    validation and at the end of each epoch.

    Args:
        network: Maps `[B, ...]` inputs to outputs `[B, ...]` that `loss` compares with the
            targets.
        optimizer: Partial that builds the optimizer from an iterable of parameters.
        scheduler: Optional partial that builds an LR scheduler from the optimizer.
            ReduceLROnPlateau schedulers monitor `val_loss`.

    Attributes:
        has_accuracy: Whether the task logs `<split>_acc` (the fused module reads it too).
        per_class_test_acc: After `trainer.test`, the per-class test accuracy `[C]`, or None
            for a task without classes.
        test_confusion: After `trainer.test`, the test confusion matrix `[C, C]` (row: true
            class, column: predicted class, counts), or None for a task without classes.
    """

    has_accuracy: ClassVar[bool] = False
    # Batches between two reads of the non-finite flag: each read waits for the device, so
    # reading every step would throw away a GPU's lead on small, launch-bound networks.
    finite_check_every: ClassVar[int] = 50

    def __init__(
        self,
        network: nn.Module,
        optimizer: OptimizerFactory,
        scheduler: SchedulerFactory | None = None,
    ) -> None:
        super().__init__()
        self.network = network
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        # The torchmetrics a task updates in validation and test; the loss needs none (the
        # steps log it), so a task with metrics fills this in its own __init__.
        self.metrics = nn.ModuleDict()
        self.per_class_test_acc: torch.Tensor | None = None
        self.test_confusion: torch.Tensor | None = None

    # -- task-specific hooks ------------------------------------------------------------------
    @abstractmethod
    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The batch's mean loss (a 0-d tensor) of network outputs against targets."""

    def count_correct(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor | None:
        """Correct predictions in a batch, or None for a task without accuracy (the base)."""
        return None

    def update_metrics(self, split: str, output: torch.Tensor, target: torch.Tensor) -> None:
        """Feed one validation/test batch to the split's metrics (the base has none)."""

    def update_per_class(self, output: torch.Tensor, target: torch.Tensor) -> None:
        """Feed one test batch to the per-class accuracy and the confusion matrix (the base
        has no classes)."""

    # -- Lightning hooks ----------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Run the network."""
        return self.network(x)

    def on_train_epoch_start(self) -> None:
        # [loss sum, correct, examples]: plain tensor sums on the module's device instead of
        # per-step self.log and metric updates, which cost more than a small MLP's whole step.
        self._train_sums = torch.zeros(3, dtype=sum_dtype(self.device), device=self.device)
        # The batch index of the epoch's first non-finite loss (-1: none yet), and that loss.
        self._bad_batch = torch.full((), -1, dtype=torch.long, device=self.device)
        self._bad_loss = torch.zeros((), device=self.device)

    def training_step(self, batch: Sequence[torch.Tensor], batch_idx: int) -> torch.Tensor:
        inputs, target = batch
        output = self(inputs)
        loss = self.loss(output, target)
        detached = loss.detach()
        first = ~torch.isfinite(detached) & (self._bad_batch < 0)
        self._bad_batch.masked_fill_(first, batch_idx)
        self._bad_loss.copy_(torch.where(first, detached.to(self._bad_loss.dtype), self._bad_loss))
        correct = self.count_correct(output.detach(), target)
        count = torch.full((), target.shape[0], dtype=self._train_sums.dtype, device=self.device)
        correct = torch.zeros_like(count) if correct is None else correct.to(count.dtype)
        self._train_sums += torch.stack([detached.to(count.dtype) * count, correct, count])
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if (batch_idx + 1) % self.finite_check_every == 0:
            self.check_finite()

    def on_validation_epoch_start(self) -> None:
        if not self.trainer.sanity_checking:
            self.check_finite()  # no validation of a network whose loss went non-finite

    def check_finite(self) -> None:
        """Raise if a training loss of this epoch was non-finite, on any process (one read of
        the device, and under DDP one collective, so every process stops together).

        Raises:
            FloatingPointError: naming the epoch, the batch and the loss.
        """
        local = getattr(self, "_bad_batch", None)
        if local is None:
            return
        bad_batch = int(self.trainer.strategy.reduce(local.clone(), reduce_op="max"))
        if bad_batch < 0:
            return
        loss = float(self._bad_loss) if int(local) == bad_batch else "not finite"
        raise FloatingPointError(
            f"training loss is {loss} at epoch {self.current_epoch} batch {bad_batch}; "
            "try a lower learning rate"
        )

    def on_train_epoch_end(self) -> None:
        self.check_finite()
        loss_sum, correct, count = self._train_sums.tolist()
        if not count:
            return
        epoch_metrics = {"train_loss": loss_sum / count}
        if self.has_accuracy:
            epoch_metrics["train_acc"] = correct / count
        # Progress bar and callback_metrics only: the row goes to the loggers here, and is on
        # disk, before the resume checkpoint of this epoch is saved (Lightning calls this hook
        # before ModelCheckpoint's, but logs `self.log` epoch values only after it), so a run
        # killed between the two cannot lose the epoch's row from metrics.csv.
        for name, value in epoch_metrics.items():
            self.log(name, value, logger=False)
        for logger in self.loggers:
            logger.log_metrics(
                {**epoch_metrics, "epoch": self.current_epoch}, step=self.global_step - 1
            )
            logger.save()

    def _eval_step(self, batch: Sequence[torch.Tensor], split: str) -> None:
        inputs, target = batch
        output = self(inputs)
        loss = self.loss(output, target)
        self.log(f"{split}_loss", loss, on_step=False, on_epoch=True, prog_bar=split == "val")
        self.update_metrics(split, output, target)

    def validation_step(self, batch: Sequence[torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: Sequence[torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        save_rng_state(checkpoint, self.device)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        restore_rng_state(checkpoint, self.device)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters the optimizer updates: every parameter that requires grad."""
        return [p for p in self.network.parameters() if p.requires_grad]

    def optimizer_parameters(self) -> list[nn.Parameter] | list[dict[str, Any]]:
        """What the optimizer gets: the trainable parameters (or parameter groups)."""
        return self.trainable_parameters()

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(self.optimizer_parameters())
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "monitor": "val_loss", "interval": "epoch"},
        }


class ClassifierModule(TaskModule):
    """Cross-entropy classifier around any network mapping inputs to logits.

    Logs `train_acc`, `val_acc` and `test_acc` besides the losses; after `trainer.test` the
    per-class test accuracy is in `per_class_test_acc` and the confusion matrix in
    `test_confusion`.

    Args:
        network: Maps `[B, ...]` inputs to logits `[B, num_classes]`.
        optimizer: Partial that builds the optimizer from an iterable of parameters.
        scheduler: Optional partial that builds an LR scheduler from the optimizer.
            ReduceLROnPlateau schedulers monitor `val_loss`.
        num_classes: Number of logits (labels keep their original indices under class
            subsets, so this is the full class count).
    """

    has_accuracy: ClassVar[bool] = True

    def __init__(
        self,
        network: nn.Module,
        optimizer: OptimizerFactory,
        scheduler: SchedulerFactory | None = None,
        num_classes: int = 10,
    ) -> None:
        super().__init__(network=network, optimizer=optimizer, scheduler=scheduler)
        self.num_classes = num_classes
        self.metrics = self.build_metrics()

    def build_metrics(self) -> nn.ModuleDict:
        """Validation/test accuracy, per-class test accuracy (`average=None`) and the test
        confusion matrix (counts on the module's device, read once, after the test epoch)."""
        acc = lambda: MulticlassAccuracy(self.num_classes, average="micro")  # noqa: E731
        return nn.ModuleDict(
            {
                "val_acc": acc(),
                "test_acc": acc(),
                "test_per_class": MulticlassAccuracy(self.num_classes, average=None),
                "test_confusion": MulticlassConfusionMatrix(self.num_classes),
            }
        )

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of logits `[B, C]` against labels `[B]`."""
        return F.cross_entropy(output, target)

    def count_correct(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Correct argmax predictions: logits `[..., B, C]` and labels `[B]` → counts `[...]`.

        A single module's `[B, C]` gives a 0-d count; the fused module's stacked `[K, B, C]`
        gives one count per member from the same rule.
        """
        return (output.argmax(dim=-1) == target).sum(dim=-1)

    def update_metrics(self, split: str, output: torch.Tensor, target: torch.Tensor) -> None:
        """Feed one validation/test batch to the split's accuracy, logged for the epoch."""
        metric = self.metrics[f"{split}_acc"]
        metric(output, target)
        self.log(f"{split}_acc", metric, on_step=False, on_epoch=True)
        if split == "test":
            self.update_per_class(output, target)

    def update_per_class(self, output: torch.Tensor, target: torch.Tensor) -> None:
        """Feed one test batch (logits `[B, C]`, labels `[B]`) to the per-class accuracy and
        the confusion matrix."""
        self.metrics["test_per_class"].update(output, target)
        self.metrics["test_confusion"].update(output, target)

    def on_test_epoch_end(self) -> None:
        self.per_class_test_acc = self.metrics["test_per_class"].compute().cpu()
        self.test_confusion = self.metrics["test_confusion"].compute().cpu()
        self.metrics["test_per_class"].reset()
        self.metrics["test_confusion"].reset()


class RegressionModule(TaskModule):
    """Mean-squared-error regression (the linear-shift task); logs losses, no accuracy.

    Args:
        network: Maps `[B, D_in]` inputs to predictions `[B, D_out]`.
        optimizer: Partial that builds the optimizer from an iterable of parameters.
        scheduler: Optional partial that builds an LR scheduler from the optimizer.
            ReduceLROnPlateau schedulers monitor `val_loss`.
    """

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """MSE of predictions `[B, D]` against targets `[B, D]`."""
        return F.mse_loss(output, target)


def factory_lr(factory: Any) -> float:
    """The learning rate an optimizer partial will use: its `lr`, or the class's default.

    Raises:
        ValueError: when neither is known (LoRA+ needs the base lr to scale B's).
    """
    keywords = getattr(factory, "keywords", None) or {}
    if "lr" in keywords:
        return float(keywords["lr"])
    target = getattr(factory, "func", factory)
    try:
        default = inspect.signature(target).parameters["lr"].default
    except (TypeError, ValueError, KeyError):
        default = inspect.Parameter.empty
    if not isinstance(default, (int, float)):
        raise ValueError(
            "lora.loraplus_lr_ratio needs module.optimizer.lr to scale B's learning rate"
        )
    return float(default)


class LoRAMixin:
    """Turns a task module into its LoRA variant without touching its forward or steps.

    Args:
        network: The plain network (same architecture as the pretrained one).
        lora: The adapter configuration (a `LoRAConfig` or a mapping of its fields).
        pretrained: Path to the pretrained network weights (`.safetensors` or a Lightning
            `.ckpt`); None keeps the network's current weights (tests, or weights set by the
            caller).
        loraplus_lr_ratio: LoRA+: B (and DoRA's magnitude) learn at the optimizer's lr times
            this (`lora_lab.lora.lora_parameter_groups`); None: one lr for all.
        **kwargs: Passed on to the task module (optimizer, scheduler, num_classes, ...).

    Attributes:
        full_rank_at: The rank at which every adapted layer is full rank (`full_rank_at`).
    """

    network: nn.Module

    def __init__(
        self,
        network: nn.Module,
        lora: LoRAConfig | dict[str, Any],
        pretrained: str | Path | None = None,
        loraplus_lr_ratio: float | None = None,
        **kwargs: Any,
    ) -> None:
        if pretrained is not None:
            load_network_weights(network, pretrained)
        self.lora_config = lora if isinstance(lora, LoRAConfig) else LoRAConfig(**lora)
        self.wrapped_modules = inject_lora(network, self.lora_config)
        self.full_rank_at = full_rank_at(network)
        self.loraplus_lr_ratio = loraplus_lr_ratio
        super().__init__(network=network, **kwargs)  # type: ignore[call-arg]

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Exactly what `inject_lora` made trainable: adapters, modules_to_save, biases."""
        return lora_parameters(self.network)

    def optimizer_parameters(self) -> list[nn.Parameter] | list[dict[str, Any]]:
        """The trainable parameters; with LoRA+, PEFT's parameter groups (B at lr × ratio)."""
        if self.loraplus_lr_ratio is None:
            return self.trainable_parameters()
        lr = factory_lr(self.optimizer_factory)  # type: ignore[attr-defined]
        return lora_parameter_groups(self.network, lr, self.loraplus_lr_ratio)


class LoRAClassifierModule(LoRAMixin, ClassifierModule):
    """LoRA fine-tuning of a classifier."""


class LoRARegressionModule(LoRAMixin, RegressionModule):
    """LoRA fine-tuning of a regression model (linear-shift task)."""


LORA_VARIANTS: dict[type[TaskModule], type[TaskModule]] = {
    ClassifierModule: LoRAClassifierModule,
    RegressionModule: LoRARegressionModule,
}


def lora_variant(module_class: type[TaskModule]) -> type[TaskModule]:
    """The LoRA subclass of a task module class (e.g. ClassifierModule → LoRAClassifierModule)."""
    if module_class in LORA_VARIANTS.values():
        return module_class
    try:
        return LORA_VARIANTS[module_class]
    except KeyError:
        known = ", ".join(c.__name__ for c in LORA_VARIANTS)
        raise ValueError(
            f"module {module_class.__name__} has no LoRA variant; known modules: {known}"
        ) from None
