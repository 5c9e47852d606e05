"""Optimizers for the members of a fused pass: one shared optimizer with each member's param
groups (one, or LoRA+'s A and B groups) when their optimizers differ only in learning rate,
else one optimizer each; a scheduler per member either way.

One optimizer with K groups computes exactly what K optimizers compute (Adam, SGD and the
like keep their state per parameter and read the learning rate per group), but takes one
`step()` a batch instead of K. On a small network that matters: a step's own Python (hooks,
checks; under Lightning, torch's CUDA-availability check goes through NVML on every step)
cost more than its kernel, and K of them were a third of a 21-member pass's time.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Sequence
from typing import Any

import torch

from lora_lab.models.module import TaskModule


def single_kernel(factory: Any) -> Any:
    """The optimizer factory with `fused=True` when the optimizer offers it and the config
    leaves the implementation to torch (no `fused` / `foreach` given).

    The same algorithm in one kernel per step: torch's default per-parameter loop on CPU was
    a quarter of a fused pass's step (Adam, 6 tensors per adapter). Results differ only in
    float rounding.
    """
    keywords = getattr(factory, "keywords", None)
    target = getattr(factory, "func", None)
    if not isinstance(keywords, dict) or not isinstance(target, type):
        return factory
    if keywords.get("fused") is not None or keywords.get("foreach") is not None:
        return factory
    if "fused" not in inspect.signature(target).parameters:
        return factory
    return _with_fused(factory)


def _with_fused(factory: Any) -> Any:
    def fused_factory(params: Any) -> torch.optim.Optimizer:
        params = list(params)
        try:
            return factory(params, fused=True)
        except (RuntimeError, TypeError, ValueError):  # e.g. a dtype or device without a kernel
            return factory(params)

    return fused_factory


class ParamGroupView(torch.optim.Optimizer):
    """A member's param groups of a shared optimizer (one, or LoRA+'s A and B groups), seen
    as an optimizer of its own, so that a member's scheduler (ReduceLROnPlateau, StepLR, ...)
    changes that member's learning rates only. It owns nothing: stepping is the shared
    optimizer's job.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, indices: int | Sequence[int]) -> None:
        # No Optimizer.__init__: the groups and the state are the shared optimizer's.
        self.shared = optimizer
        self.indices = [indices] if isinstance(indices, int) else list(indices)
        self.defaults = optimizer.defaults
        self._opt_called = True  # the shared optimizer steps; schedulers need not warn

    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        # Looked up each time: loading a state dict replaces the shared optimizer's groups.
        return [self.shared.param_groups[i] for i in self.indices]

    @property
    def state(self) -> Any:  # type: ignore[override]
        return self.shared.state

    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        raise RuntimeError("a ParamGroupView does not step; step the shared optimizer")


def member_groups(member: TaskModule, lr: Any) -> list[dict[str, Any]]:
    """The member's param groups as its own optimizer gets them: one group at `lr` (None:
    the optimizer's default), or LoRA+'s groups at their own rates."""
    params = member.optimizer_parameters()
    if params and isinstance(params[0], dict):
        return [{"params": list(g["params"]), "lr": g["lr"]} for g in params]  # type: ignore[index]
    return [{"params": list(params), **({"lr": lr} if lr is not None else {})}]


def shared_optimizer(
    members: Sequence[TaskModule], merge: bool = False
) -> tuple[torch.optim.Optimizer, list[list[int]]] | None:
    """One optimizer holding every member's param groups, when every member's optimizer
    partial has the same class and arguments apart from `lr`; None otherwise. Also returns
    each member's group indices. With `merge` (no member has a scheduler, so no group's rate
    ever changes alone) groups of equal `lr` are one group: fewer groups, less per-group work
    in every step, the same arithmetic."""
    factories = [member.optimizer_factory for member in members]
    classes = {getattr(f, "func", None) for f in factories}
    if len(classes) != 1 or not isinstance(next(iter(classes)), type):
        return None
    if any(getattr(f, "args", ()) for f in factories):
        return None
    keywords = [dict(getattr(f, "keywords", None) or {}) for f in factories]
    common = [{k: v for k, v in kw.items() if k != "lr"} for kw in keywords]
    if any(other != common[0] for other in common):
        return None
    groups: list[dict[str, Any]] = []
    by_lr: dict[Any, int] = {}
    indices: list[list[int]] = []
    for member, kw in zip(members, keywords, strict=True):
        mine: list[int] = []
        for group in member_groups(member, kw.get("lr")):
            lr = group.get("lr")
            if merge and lr in by_lr:
                groups[by_lr[lr]]["params"] += group["params"]
            else:
                by_lr[lr] = len(groups)
                groups.append(group)
            mine.append(by_lr[lr] if merge else len(groups) - 1)
        indices.append(mine)
    factory = functools.partial(next(iter(classes)), **common[0])
    return single_kernel(factory)(groups), indices


def member_optimizers(
    members: Sequence[TaskModule], separate: bool = False
) -> tuple[list[torch.optim.Optimizer], list[Any]]:
    """The pass's optimizers (one shared, or one per member) and each member's scheduler
    (None where it has none), built from the members' own optimizer and scheduler partials.

    With `separate` (fp16: a scaler per member unscales and steps its own optimizer), each
    member gets the optimizer its run alone builds.
    """
    no_schedulers = all(m.scheduler_factory is None for m in members)
    shared = None if separate else shared_optimizer(members, merge=no_schedulers)
    if shared is not None and no_schedulers:
        return [shared[0]], [None] * len(members)
    if shared is not None:
        optimizer, indices = shared
        views = [ParamGroupView(optimizer, mine) for mine in indices]
        schedulers = [
            m.scheduler_factory(view) if m.scheduler_factory is not None else None
            for m, view in zip(members, views, strict=True)
        ]
        return [optimizer], schedulers
    optimizers, schedulers = [], []
    for member in members:
        factory = member.optimizer_factory if separate else single_kernel(member.optimizer_factory)
        optimizer = factory(member.optimizer_parameters())
        optimizers.append(optimizer)
        scheduler = member.scheduler_factory
        schedulers.append(scheduler(optimizer) if scheduler is not None else None)
    return optimizers, schedulers
