"""Training for a fused group (`pipeline.fused` decides which runs form one): one forward
pass of the grouped network per batch, the summed loss, and a step of each member's own
optimizer.

It reproduces, per member, what `run_stage` and its Trainer do (build and seeding, epoch-end
logging, scheduler steps, test metrics, the saved adapter and `result.json`), so that a fused
run's outputs are those of its sequential run; `pipeline.fused` says what is shared and why.
"""

from __future__ import annotations

import copy
import ctypes
import ctypes.util
import inspect
import itertools
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, open_dict
from torch import nn

import lora_lab.pipeline.sweep as sweep  # a module import: sweep.py may import this module
from lora_lab.lora import count_parameters, save_adapter
from lora_lab.lora.grouped import (
    check_grouped,
    cross_entropy_per_adapter,
    group_networks,
)
from lora_lab.models import ClassifierModule
from lora_lab.pipeline.stages import _relative_delta_error, _test, build_module, run_id_for

if TYPE_CHECKING:
    from lora_lab.pipeline.sweep import PlannedRun

PROBE_SIZE = 16


@dataclass
class Member:
    """One run of a fused group: its per-run config, module (network + adapter) and optimizer."""

    run: PlannedRun
    cfg: DictConfig
    run_id: str
    module: ClassifierModule
    optimizer: torch.optim.Optimizer
    scheduler: Any
    loggers: list[Any]
    error: str | None = None

    @classmethod
    def build(cls, run: PlannedRun, study_dir: Path, pretrained: Path) -> Member:
        """Build the run's module exactly as `run_stage` does, so it starts from the same init."""
        run_cfg = copy.deepcopy(run.cfg)
        # The plan names runs (and adapters) when a sweep varies alpha or the learning rate;
        # a bare PlannedRun gets run_stage's default names.
        run_id = getattr(run, "run_id", "") or run_id_for(
            "lora", run.rank, float(run_cfg.lora.alpha), run.seed
        )
        run_dir = study_dir / "runs" / run_id
        run_dir.mkdir(parents=True, exist_ok=True)
        with open_dict(run_cfg):
            run_cfg.run_id, run_cfg.run_dir = run_id, str(run_dir)
        L.seed_everything(int(run_cfg.seed), workers=True, verbose=False)
        instantiate(run_cfg.data)  # run_stage builds the data first; keep the RNG in step
        module = build_module(run_cfg, instantiate(run_cfg.model), pretrained)
        module.optimizer_factory = _single_kernel(module.optimizer_factory)
        configured = module.configure_optimizers()
        optimizer, scheduler = configured, None
        if isinstance(configured, dict):
            optimizer, scheduler = configured["optimizer"], configured["lr_scheduler"]["scheduler"]
        loggers = [instantiate(c) for c in run_cfg.logger.values()] if run_cfg.get("logger") else []
        return cls(run, run_cfg, run_id, module, optimizer, scheduler, loggers)

    @property
    def classifier(self) -> bool:
        return "val_acc" in self.module.metrics

    def log(self, metrics: dict[str, float], step: int) -> None:
        """Log one row, as Lightning's epoch-end logging does."""
        for logger in self.loggers:
            logger.log_metrics(metrics, step=step)

    def step_scheduler(self, val_loss: float | None) -> None:
        """Epoch-end scheduler step; ReduceLROnPlateau watches this run's own `val_loss`."""
        if isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            if val_loss is not None:
                self.scheduler.step(val_loss)
        elif self.scheduler is not None:
            self.scheduler.step()


def _single_kernel(factory: Any) -> Any:
    """The optimizer factory with `fused=True` when the optimizer offers it and the config
    leaves the implementation to torch (no `fused` / `foreach` given).

    The same algorithm in one kernel per step: K adapters take K optimizer steps per batch,
    and torch's default per-parameter loop on CPU was a quarter of a fused step (Adam, 6
    tensors per adapter). Results differ only in float rounding.
    """
    keywords = getattr(factory, "keywords", None)
    target = getattr(factory, "func", None)
    if not isinstance(keywords, dict) or not isinstance(target, type):
        return factory
    if keywords.get("fused") is not None or keywords.get("foreach") is not None:
        return factory
    if "fused" not in inspect.signature(target).parameters:
        return factory

    def fused_factory(params: Any) -> torch.optim.Optimizer:
        params = list(params)
        try:
            return factory(params, fused=True)
        except (RuntimeError, TypeError, ValueError):  # e.g. a dtype or device without a kernel
            return factory(params)

    return fused_factory


def retain_freed_memory() -> bool:
    """Ask glibc's malloc to keep freed memory for reuse instead of handing it back at once.

    A fused step allocates and frees activations of `[K, B, width]` (~2 MB each) dozens of
    times. With glibc's defaults such blocks are mmapped, or the heap top is trimmed, so every
    step faults their pages in again and unmapping interrupts the other core; on the 2-core VM
    this was 15-45 % of a step. A 32 MB mmap threshold and a 256 MB trim threshold keep the
    memory in the heap. Process-wide and lasting (a training process loses nothing by it);
    returns False where there is no glibc `mallopt`.
    """
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c")).mallopt
    except (OSError, AttributeError, TypeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    return bool(mallopt(m_mmap_threshold, 32 << 20)) and bool(mallopt(m_trim_threshold, 256 << 20))


def _limit(total: int, limit: int | float | None) -> int:
    """Batches per epoch under a Lightning `limit_*_batches` value (int: count, float: share)."""
    if limit is None:
        return total
    return int(total * limit) if isinstance(limit, float) else min(total, int(limit))


class _ThreadChooser:
    """Picks intra-op threads for training steps: torch's own count, or one thread.

    On a small machine shared with other jobs, a fused step (hundreds of small ops) ran 3-20x
    slower with two threads whenever another process held the second core, since every op
    waits at the thread pool's barrier; on a free machine two threads are ~1.4x faster. So each
    epoch starts by timing a few steps with each, keeps the faster, and drops to one thread if a
    later step takes over twice the timed step. Speed only: MKL gave bit-identical GEMMs here.
    """

    TRIAL = 4  # steps per candidate; the first is not timed (warm-up)

    def __init__(self) -> None:
        self.candidates = [torch.get_num_threads(), 1]
        self.step_seconds = [math.inf, math.inf]
        self.start = self.last = 0.0

    def at(self, batch_idx: int) -> None:
        """Call before training step `batch_idx` of an epoch."""
        now, elapsed = time.perf_counter(), time.perf_counter() - self.last
        self.last = now
        if self.candidates[0] == 1:
            return
        phase, offset = divmod(batch_idx, self.TRIAL)
        if phase <= 2 and offset == 0:
            if phase > 0:
                self.step_seconds[phase - 1] = (now - self.start) / (self.TRIAL - 1)
            fastest = self.step_seconds.index(min(self.step_seconds))
            torch.set_num_threads(self.candidates[phase if phase < 2 else fastest])
        elif phase < 2 and offset == 1:
            self.start = now
        elif phase >= 2 and torch.get_num_threads() > 1 and elapsed > 2 * self.step_seconds[0]:
            torch.set_num_threads(1)

    def restore(self) -> None:
        """Put torch's own thread count back."""
        torch.set_num_threads(self.candidates[0])


class FusedGroup:
    """A fused group's training: one fused forward per batch, summed loss, per-member steps.

    Args:
        group: LoRA runs from `fusable`.
        study_dir: The study folder.
        pretrained: The pretrained network weights.

    Raises:
        GroupingError: If the networks cannot be fused.
    """

    def __init__(self, group: Sequence[PlannedRun], study_dir: Path, pretrained: Path) -> None:
        self.members = [Member.build(run, study_dir, pretrained) for run in group]
        self.active = list(self.members)
        self.study_dir, self.pretrained = study_dir, pretrained
        self.trainer = self.members[0].cfg.trainer
        # All members have the same data config: one DataModule serves them all.
        self.datamodule = instantiate(self.members[0].cfg.data)
        self.datamodule.prepare_data()
        self.datamodule.setup("fit")
        for logger in (logger for member in self.members for logger in member.loggers):
            logger.log_hyperparams(self.datamodule.hparams)  # hparams.yaml, as the Trainer writes
        self.grouped = group_networks([m.module.network for m in self.active])
        # A probe of K rows could pass a [B, ...] input off as [K, B, ...]: avoid that size.
        probe_rows = PROBE_SIZE + (len(self.members) == PROBE_SIZE)
        probe = next(iter(self.datamodule.val_dataloader()))[0][:probe_rows]
        check_grouped(self.grouped, [m.module.network for m in self.active], probe)
        self.epochs = self.steps = 0
        self.seconds = 0.0
        self.threads = _ThreadChooser()
        # The classifiers' own loss, computed for all K at once (see cross_entropy_per_adapter).
        self.cross_entropy = all(type(m.module).loss is ClassifierModule.loss for m in self.members)

    def _losses(
        self, inputs: torch.Tensor, target: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        outputs = self.grouped(inputs)  # [K, B, ...]
        if self.cross_entropy:
            return outputs, cross_entropy_per_adapter(outputs, target)
        pairs = zip(self.active, outputs.unbind(0), strict=True)
        return outputs, torch.stack([m.module.loss(out, target) for m, out in pairs])  # [K]

    def _sums(
        self, sums: torch.Tensor, outputs: torch.Tensor, losses: torch.Tensor, target: torch.Tensor
    ) -> None:
        sums[:, 0] += (
            losses.detach().double() * target.shape[0]
        )  # batch-size-weighted, as Lightning
        if self.active[0].classifier:
            sums[:, 1] += (outputs.detach().argmax(dim=-1) == target).sum(dim=1)

    def _metrics(self, split: str, sums: torch.Tensor, count: int) -> dict[int, dict[str, float]]:
        metrics = {}
        for member, (loss, correct) in zip(self.active, sums.tolist(), strict=True):
            # float32, as Lightning logs and returns them
            values = {f"{split}_loss": loss, f"{split}_acc": correct if member.classifier else None}
            metrics[id(member)] = {
                k: float(torch.tensor(v / max(count, 1), dtype=torch.float32))
                for k, v in values.items()
                if v is not None
            }
        return metrics

    def train_epoch(self, loader: Any, batches: int, epoch: int) -> dict[int, dict[str, float]]:
        """One epoch over `batches` batches; returns train metrics per still-active member."""
        self.grouped.train()
        sums = torch.zeros(len(self.active), 2, dtype=torch.float64)  # [K, (loss·n, correct)]
        count = 0
        for batch_idx, (inputs, target) in enumerate(itertools.islice(loader, batches)):
            self.threads.at(batch_idx)
            outputs, losses = self._losses(inputs, target)
            finite = torch.isfinite(losses.detach())
            for member in self.active:
                member.optimizer.zero_grad(set_to_none=True)
            all_finite = bool(finite.all())
            # An adapter's parameters reach only its own loss, so the sum's gradient is each
            # adapter's own; a non-finite loss is left out so it cannot spread.
            (losses.sum() if all_finite else losses[finite].sum()).backward()
            for member, ok in zip(self.active, finite.tolist(), strict=True):
                if ok:
                    member.optimizer.step()
            self._sums(sums, outputs, losses, target)
            count += target.shape[0]
            self.steps += 1
            if not all_finite:
                sums = self._drop(finite, sums, f"at epoch {epoch} batch {batch_idx}")
        return self._metrics("train", sums, count)

    def _drop(self, finite: torch.Tensor, sums: torch.Tensor, where: str) -> torch.Tensor:
        """Stop training the members whose loss is not finite; the others go on."""
        keep = finite.tolist()
        for member, ok in zip(self.active, keep, strict=True):
            if not ok:  # the message ClassifierModule.training_step raises with
                member.error = f"training loss is not finite {where}; try a lower learning rate"
        self.active = [m for m, ok in zip(self.active, keep, strict=True) if ok]
        if self.active:
            self.grouped = group_networks([m.module.network for m in self.active])
        return sums[finite]

    @torch.no_grad()
    def evaluate(self, loader: Any, batches: int, split: str) -> dict[int, dict[str, float]]:
        """`<split>_loss` and `<split>_acc` per active member ("val" or "test")."""
        self.grouped.eval()
        sums = torch.zeros(len(self.active), 2, dtype=torch.float64)
        count = 0
        for inputs, target in itertools.islice(loader, batches):
            outputs, losses = self._losses(inputs, target)
            self._sums(sums, outputs, losses, target)
            count += target.shape[0]
            if split == "test" and self.active[0].classifier:
                for member, out in zip(self.active, outputs.unbind(0), strict=True):
                    member.module.metrics["test_per_class"].update(out, target)
        return self._metrics(split, sums, count)

    def fit(self) -> None:
        """Train every epoch; log and schedule each member from its own metrics."""
        train_loader, val_loader = (
            self.datamodule.train_dataloader(),
            self.datamodule.val_dataloader(),
        )
        train_batches = _limit(len(train_loader), self.trainer.get("limit_train_batches"))
        val_batches = _limit(len(val_loader), self.trainer.get("limit_val_batches"))
        L.seed_everything(int(self.members[0].cfg.seed), verbose=False)  # reproducible dropout
        retain_freed_memory()
        start = time.perf_counter()
        self._epochs(train_loader, train_batches, val_loader, val_batches)
        self.seconds = time.perf_counter() - start

    def _epochs(
        self, train_loader: Any, train_batches: int, val_loader: Any, val_batches: int
    ) -> None:
        for epoch in range(int(self.trainer.max_epochs)):
            if not self.active:
                break
            if hasattr(train_loader.sampler, "set_epoch"):  # as Lightning: this epoch's order
                train_loader.sampler.set_epoch(epoch)
            trained = self.train_epoch(train_loader, train_batches, epoch)
            validated = self.evaluate(val_loader, val_batches, "val") if val_batches else {}
            for member in self.active:
                val = validated.get(id(member))
                if val:
                    member.log({**val, "epoch": epoch}, self.steps - 1)
                member.log({**trained[id(member)], "epoch": epoch}, self.steps - 1)
                member.step_scheduler(val["val_loss"] if val else None)
            self.epochs = epoch + 1

    def finish(self, env: dict[str, Any]) -> list[dict[str, Any]]:
        """Test, save each adapter, write logs and `result.json`; return the rows."""
        self.datamodule.setup("test")
        loader = self.datamodule.test_dataloader()
        batches = _limit(len(loader), self.trainer.get("limit_test_batches"))
        tested = self.evaluate(loader, batches, "test") if self.active else {}
        results = []
        for member in self.members:
            if member.error is not None or id(member) not in tested:
                error = FloatingPointError(member.error or "training stopped")
                result = sweep._failed_result(member.run, error)
                for logger in member.loggers:
                    logger.finalize("failed")
            else:
                member.log({**tested[id(member)], "epoch": self.epochs}, self.steps)
                for logger in member.loggers:
                    logger.finalize("success")
                result = self._result(member, tested[id(member)])
            sweep.record(member.run.cfg, self.study_dir, result, env)
            results.append(result)
        return results

    def _result(self, member: Member, tested: dict[str, float]) -> dict[str, Any]:
        """Save the member's adapter and build its row with `run_stage`'s columns."""
        run, network, datamodule = member.run, member.module.network, self.datamodule
        member.module.on_test_epoch_end()  # per-class test accuracy, as after trainer.test
        test_row = _test(_MeasuredTrainer(tested), member.module, datamodule)  # type: ignore[arg-type]
        counts = count_parameters(network)
        adapter = getattr(run, "adapter", "") or f"rank_{run.rank}_seed_{run.seed}"
        save_adapter(network, self.study_dir / "adapters" / adapter)
        result: dict[str, Any] = {
            "run_id": member.run_id,
            "stage": "lora",
            "rank": run.rank,
            "alpha": float(member.cfg.lora.alpha),
            "seed": run.seed,
            "learning_rate": float(member.cfg.module.optimizer.lr),
            "trainable_params": counts["trainable"],
            "total_params": counts["total"],
            **test_row,
            "source_test_acc": None,
            # The group's training time, shared out: the column still sums to the time spent.
            "train_seconds": round(self.seconds / len(self.members), 3),
            "epochs": self.epochs,
            "run_dir": f"runs/{member.run_id}",
            "status": "ok",
            "error": "",
            "identity": getattr(run, "identity", None),
        }
        fingerprint = getattr(datamodule, "fingerprint", None)
        if callable(fingerprint):
            result["data_fingerprint"] = fingerprint()
        delta_error = _relative_delta_error(member.module, datamodule, self.pretrained)
        if delta_error is not None:
            result["delta_rel_error"] = delta_error
        if not math.isfinite(result["test_loss"]):
            result["status"], result["error"] = "failed", "test loss is not finite"
        return result


class _MeasuredTrainer:
    """Stands in for the Trainer in `stages._test`, which turns test metrics into row fields."""

    def __init__(self, metrics: dict[str, float]) -> None:
        self.metrics = metrics

    def test(
        self, module: nn.Module, datamodule: Any = None, verbose: bool = True
    ) -> list[dict[str, float]]:
        return [self.metrics]
