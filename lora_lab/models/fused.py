"""The fused LightningModule: K LoRA runs on one frozen network, trained in one pass per batch.

Every member is a LoRA task module built exactly as its sequential run builds it (same seed,
same init); the fused module adds no forward code of its own. It groups the members' networks
(`lora.grouped`): each batch is read once, the frozen layers before the first adapted one run
once, and the K adapters' activations are stacked `[K, B, ...]` after it. The loss is the sum
of the K per-member losses, so every adapter gets exactly the gradient it would get alone.

Manual optimization: each member keeps its own optimizer state, learning rate, scheduler
(ReduceLROnPlateau steps on the member's own `val_loss`) and dropout masks. Members whose
optimizers differ only in learning rate share one optimizer with a param group each
(`member_optim`), which computes the same and steps once a batch; others get one each.
The stock `Trainer` drives it, so devices, precision, DDP, checkpoints and resume, and the
progress bar are Lightning's. Each member's epoch rows go to that member's own loggers, as its
sequential run would write them; a member whose loss turns non-finite stops alone. As in the
sequential module, a training step never reads the device: non-finite losses are flagged on
the device and read every `finite_check_every` batches, before validation and at epoch end.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import Logger
from torch import nn

from lora_lab.lora.grouped import cross_entropy_per_adapter, group_networks, share_frozen
from lora_lab.models.member_optim import member_optimizers
from lora_lab.models.member_steps import MemberScalers, StepOptions
from lora_lab.models.module import ClassifierModule, TaskModule
from lora_lab.models.run_state import restore_rng_state, save_rng_state, sum_dtype

SPLITS = ("train", "val", "test")


class FusedLoRAModule(L.LightningModule):
    """K LoRA members of one frozen network, trained together under one Trainer.

    Args:
        members: LoRA task modules (e.g. `LoRAClassifierModule`) over identical frozen
            networks that differ only in their adapters, learning rates or schedulers.
        loggers: Per member, the loggers its epoch rows go to (its sequential run's loggers).
        steps: Gradient clipping and accumulation, applied per member (the pass's Trainer
            must not set them: Lightning refuses them under manual optimization).

    After `trainer.test`, `test_metrics[k]` holds member k's `test_loss` (and `test_acc`),
    and each member's `per_class_test_acc` is set as `trainer.test` sets it.
    """

    finite_check_every = TaskModule.finite_check_every

    def __init__(
        self,
        members: Sequence[TaskModule],
        loggers: Sequence[Sequence[Logger]] | None = None,
        steps: StepOptions | None = None,
    ) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.members = nn.ModuleList(members)
        share_frozen([m.network for m in members])  # one frozen network in memory, not K
        self.member_loggers = [list(group) for group in loggers or [[] for _ in members]]
        self.steps = steps or StepOptions()
        self.scalers = MemberScalers()  # fp16: filled in `setup` from the Trainer's plugin
        # Buffers, so a checkpoint (and a spawned DDP worker's returned weights) carry them.
        self.register_buffer("active", torch.ones(len(members), dtype=torch.bool))
        # Optimizer steps taken: a member's trainer.global_step alone (one per batch unless
        # gradients accumulate), the step its log rows carry.
        self.register_buffer("batches_seen", torch.zeros((), dtype=torch.long))
        # Per member, the (epoch, batch) where its loss first went non-finite, (-1, -1) while
        # it trains: a buffer, so a spawned DDP worker's failures reach the parent too.
        self.register_buffer("failed_at", torch.full((len(members), 2), -1, dtype=torch.long))
        # While training, the host's copy of `active` (read once a fit, after a resume has
        # restored the buffer, so that a step does not read the device); None: read the buffer.
        self._active_host: list[bool] | None = None
        self.grouped = group_networks([m.network for m in members])
        self._grouped_for = list(range(len(members)))
        self.has_accuracy = members[0].has_accuracy  # the members share one task
        # The classifiers' own loss for all K at once (see cross_entropy_per_adapter).
        self.cross_entropy = all(type(m).loss is ClassifierModule.loss for m in members)
        self._sums: dict[str, torch.Tensor] = {}
        self._schedulers: list[Any] = []
        self._scheduler_states: list[Any] = []
        self.val_metrics: dict[int, dict[str, float]] = {}
        self.test_metrics: dict[int, dict[str, float]] = {}

    # -- the grouped forward ------------------------------------------------------------------
    def indices(self) -> list[int]:
        """The members still training (all, unless a loss went non-finite)."""
        active = self.active.tolist() if self._active_host is None else self._active_host
        return [k for k, ok in enumerate(active) if ok]

    def _refresh(self) -> list[int]:
        """Regroup the networks if the set of active members changed (e.g. after a resume)."""
        indices = self.indices()
        if indices != self._grouped_for and indices:
            self.grouped = group_networks([self.members[k].network for k in indices])
            self._grouped_for = indices
        return indices

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """Outputs of the active members: `[B, ...]` → `[K_active, B, ...]`."""
        return self.grouped(inputs)

    def _losses(
        self, inputs: torch.Tensor, target: torch.Tensor, indices: list[int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        outputs = self(inputs)  # [K, B, ...]
        if self.cross_entropy:
            return outputs, cross_entropy_per_adapter(outputs, target)
        pairs = zip(indices, outputs.unbind(0), strict=True)
        return outputs, torch.stack([self.members[k].loss(out, target) for k, out in pairs])

    def _accumulate(
        self,
        split: str,
        indices: list[int],
        outputs: torch.Tensor,
        losses: torch.Tensor,
        target: torch.Tensor,
    ) -> None:
        """Add a batch to the split's per-member `[loss·n, correct, n]` sums (on the device,
        so a GPU step does not wait for them)."""
        rows = self._rows(indices, losses.device)
        count = torch.full_like(losses, target.shape[0], dtype=self._sums[split].dtype)
        # The task's own rule, applied to the stacked outputs: one count per member.
        correct = self.members[0].count_correct(outputs.detach(), target)
        correct = torch.zeros_like(count) if correct is None else correct.to(count.dtype)
        # [loss·n, correct, n] per member; the loss weighted by batch size, as Lightning does
        batch = torch.stack([losses.detach().to(count.dtype) * count, correct, count], dim=1)
        # index_put_ with accumulate has a deterministic CUDA kernel; index_add_ has none.
        self._sums[split].index_put_((rows,), batch, accumulate=True)

    def _rows(self, indices: list[int], device: torch.device) -> torch.Tensor:
        """`indices` as a tensor on `device`, made once per set of active members."""
        key = (tuple(indices), device)
        if getattr(self, "_rows_key", None) != key:
            self._rows_cache = torch.tensor(indices, device=device)
            self._rows_key = key
        return self._rows_cache

    def _start(self, split: str) -> list[int]:
        # float64 sums, as the sequential module keeps, where the device has float64
        dtype = sum_dtype(self.device)
        self._sums[split] = torch.zeros(len(self.members), 3, dtype=dtype, device=self.device)
        return self._refresh()

    def _epoch_metrics(self, split: str) -> dict[int, dict[str, float]]:
        """Per active member `<split>_loss` (and `<split>_acc`), summed over every process."""
        sums = self.trainer.strategy.reduce(self._sums[split], reduce_op="sum")
        metrics: dict[int, dict[str, float]] = {}
        for k in self.indices():
            loss, correct, count = sums[k].tolist()
            if count:
                values = {f"{split}_loss": loss / count}
                if self.has_accuracy:
                    values[f"{split}_acc"] = correct / count
                # float32, as Lightning logs and returns them
                metrics[k] = {
                    n: float(torch.tensor(v, dtype=torch.float32)) for n, v in values.items()
                }
        return metrics

    def _log_rows(self, metrics: dict[int, dict[str, float]], epoch: int, step: int) -> None:
        for k, values in metrics.items():
            for logger in self.member_loggers[k]:
                logger.log_metrics({**values, "epoch": epoch}, step=step)

    # -- training -----------------------------------------------------------------------------
    def on_train_epoch_start(self) -> None:
        # Per member, the batch of this epoch's first non-finite loss (-1: none).
        self._bad_batch = torch.full((len(self.members),), -1, device=self.device)
        self._start("train")

    def training_step(self, batch: Sequence[torch.Tensor], batch_idx: int) -> None:
        inputs, target = batch
        indices = self._refresh()
        if not indices:  # every member has failed: nothing left to train
            self.trainer.should_stop = True
            return
        outputs, losses = self._losses(inputs, target, indices)
        finite = torch.isfinite(losses.detach())
        rows = self._rows(indices, losses.device)
        seen = self._bad_batch[rows]
        self._bad_batch[rows] = torch.where(~finite & (seen < 0), batch_idx, seen)
        # An adapter's parameters reach only its own loss, so the sum's gradient is each
        # member's own; a non-finite loss is masked so that it cannot spread. Its member
        # stops at the next check of the flags.
        scaled = self.scalers.scale(losses, indices)
        masked = torch.where(finite, scaled, torch.zeros_like(scaled)).sum()
        accumulate = self.steps.accumulate_grad_batches
        # Lightning divides the loss by accumulate_grad_batches, whatever the batch.
        self.manual_backward(masked / accumulate if accumulate > 1 else masked)
        if self._step_now(batch_idx):
            self._step(indices)
        self._accumulate("train", indices, outputs, losses, target)

    def _step_now(self, batch_idx: int) -> bool:
        """Lightning's rule for a run alone: step after every `accumulate_grad_batches`
        batches of the epoch, and on its last batch."""
        ready, accumulate = batch_idx + 1, self.steps.accumulate_grad_batches
        return (
            accumulate == 1 or ready % accumulate == 0 or ready == self.trainer.num_training_batches
        )

    def _step(self, indices: list[int]) -> None:
        """Clip each member's gradients as its run alone would, then step its optimizer.

        One optimizer step goes through Lightning's `LightningOptimizer` (the others step
        directly), so that `trainer.global_step` counts steps as a member's run alone counts
        them, and `max_steps` ends the pass where it ends each run.
        """
        optimizers = self.optimizers()
        if self.scalers:  # fp16: one optimizer and one scaler per member
            listed = optimizers if isinstance(optimizers, list) else [optimizers]
            raw = [optimizer.optimizer for optimizer in listed]
            self.scalers.step(raw, self.members, indices, self.steps)
            # Lightning counts steps in LightningOptimizer.step, which the scalers bypass.
            progress = self.trainer.fit_loop.epoch_loop.manual_optimization.optim_step_progress
            progress.increment_ready()
            progress.increment_completed()
            self.batches_seen += 1
            return
        self.steps.clip(self.members, indices)
        if not isinstance(optimizers, list):  # one optimizer shared by the members
            optimizers.step()
            optimizers.zero_grad(set_to_none=True)
        else:
            for position, k in enumerate(indices):
                optimizer = optimizers[k] if position == 0 else optimizers[k].optimizer
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        self.batches_seen += 1

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if (batch_idx + 1) % self.finite_check_every == 0:
            self.check_finite()

    def check_finite(self) -> None:
        """Stop the members whose training loss went non-finite this epoch, on any process
        (one read of the device, and under DDP one collective, so every process drops the
        same members)."""
        local = getattr(self, "_bad_batch", None)
        if local is None or self._active_host is None:
            return
        bad = self.trainer.strategy.reduce(local.clone(), reduce_op="max").tolist()
        for k, batch_idx in enumerate(bad):
            if batch_idx >= 0 and self._active_host[k]:
                self._active_host[k] = False
                self.active[k] = False
                self.failed_at[k, 0], self.failed_at[k, 1] = self.current_epoch, batch_idx
        if not any(self._active_host):
            self.trainer.should_stop = True

    def member_error(self, k: int) -> str | None:
        """Why member k stopped (where its loss first went non-finite), or None if it did not."""
        epoch, batch_idx = self.failed_at[k].tolist()
        if batch_idx < 0:
            return None
        return (
            f"training loss is not finite at epoch {epoch} batch {batch_idx}; "
            "try a lower learning rate"
        )

    def on_train_end(self) -> None:
        self._active_host = None  # from here on, `indices` reads the buffer

    def on_train_epoch_end(self) -> None:
        # Lightning calls this before ModelCheckpoint saves the epoch, so the rows are on disk
        # and the schedulers stepped when the resume checkpoint is written.
        self.check_finite()
        trained = self._epoch_metrics("train")
        step = int(self.batches_seen) - 1
        self._log_rows(trained, self.current_epoch, step)
        for k in self.indices():
            scheduler = self._schedulers[k]
            if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                if k in self.val_metrics:
                    scheduler.step(self.val_metrics[k]["val_loss"])
            elif scheduler is not None:
                scheduler.step()
        for logger in {id(lg): lg for group in self.member_loggers for lg in group}.values():
            logger.save()

    # -- validation and test ------------------------------------------------------------------
    def on_validation_epoch_start(self) -> None:
        if not self.trainer.sanity_checking:
            self.check_finite()  # no validation rows for a member whose loss went non-finite
        self._start("val")

    def _evaluate(self, split: str, batch: Sequence[torch.Tensor]) -> torch.Tensor:
        """Add an eval batch to the split's sums; returns the outputs `[K_active, B, ...]`."""
        inputs, target = batch
        outputs, losses = self._losses(inputs, target, self._grouped_for)
        self._accumulate(split, self._grouped_for, outputs, losses, target)
        return outputs

    def validation_step(self, batch: Sequence[torch.Tensor], batch_idx: int) -> None:
        self._evaluate("val", batch)

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            return
        self.val_metrics = self._epoch_metrics("val")
        self._log_rows(self.val_metrics, self.current_epoch, int(self.batches_seen) - 1)
        if self.val_metrics:
            best = min(m["val_loss"] for m in self.val_metrics.values())
            self.log("val_loss_best", best, prog_bar=True, logger=False, sync_dist=False)

    def on_test_epoch_start(self) -> None:
        self._start("test")

    def test_step(self, batch: Sequence[torch.Tensor], batch_idx: int) -> None:
        outputs = self._evaluate("test", batch)
        for k, out in zip(self._grouped_for, outputs.unbind(0), strict=True):
            self.members[k].update_per_class(out, batch[1])

    def on_test_epoch_end(self) -> None:
        self.test_metrics = self._epoch_metrics("test")
        for k in self.test_metrics:
            self.members[k].on_test_epoch_end()  # per-class test accuracy, as after its own test

    # -- optimizers and checkpoints -----------------------------------------------------------
    def setup(self, stage: str) -> None:
        if stage == "fit":  # before configure_optimizers and before a checkpoint is restored
            self.scalers.take_over(self.trainer.precision_plugin, len(self.members))

    def configure_optimizers(self) -> Any:
        # Schedulers stay with the module, which steps them and checkpoints their state: a
        # member's scheduler may drive one param group of a shared optimizer.
        optimizers, self._schedulers = member_optimizers(list(self.members), bool(self.scalers))
        self._load_scheduler_states()
        return optimizers

    def _load_scheduler_states(self) -> None:
        """Give the schedulers the states a resumed checkpoint brought (once)."""
        for scheduler, state in zip(self._schedulers, self._scheduler_states, strict=False):
            if scheduler is not None and state is not None:
                scheduler.load_state_dict(state)
        self._scheduler_states = []

    def on_train_start(self) -> None:
        self._active_host = self.active.tolist()
        # Strategies that restore after setup (DeepSpeed, FSDP) load the checkpoint after
        # configure_optimizers: the states arrive here instead.
        self._load_scheduler_states()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        save_rng_state(checkpoint, self.device)
        checkpoint["member_schedulers"] = [
            s.state_dict() if s is not None else None for s in self._schedulers
        ]
        # A scheduler that steps on validation epochs only still sees the last val_loss.
        checkpoint["member_val_metrics"] = dict(self.val_metrics)
        if self.scalers:
            checkpoint["member_scalers"] = self.scalers.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        restore_rng_state(checkpoint, self.device)
        # A pass checkpointed before `failed_at` existed: its members had not failed.
        checkpoint["state_dict"].setdefault("failed_at", torch.full_like(self.failed_at, -1))
        self.val_metrics = dict(checkpoint.get("member_val_metrics", {}))
        # Lightning calls configure_optimizers after this hook: it loads them.
        self._scheduler_states = list(checkpoint.get("member_schedulers", []))
        if checkpoint.get("member_scalers"):
            self.scalers.load_state_dict(checkpoint["member_scalers"])
