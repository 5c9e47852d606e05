"""What a fused pass does per member at each optimizer step, in place of Lightning's Trainer
options (which work only under automatic optimization): gradient clipping over each member's
own parameters, gradient accumulation, and fp16 loss scaling with a scaler per member.

A member's run alone is Lightning's automatic optimization: the loss divided by
`accumulate_grad_batches`, a step after every that many batches of an epoch and on its last
batch, and before each step `clip_gradients` over the optimizer's parameters, which are the
member's trainable parameters (`torch.nn.utils.clip_grad_norm_` or `clip_grad_value_`). The
fused module does the same per member, on the member's parameters only.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from lora_lab.models.module import TaskModule

#: The Trainer options a fused pass takes over, and the value its own Trainer gets instead.
TAKEN_OVER: dict[str, Any] = {
    "gradient_clip_val": None,
    "gradient_clip_algorithm": None,
    "accumulate_grad_batches": 1,
}


@dataclass(frozen=True)
class StepOptions:
    """Per-member step options of a fused pass (Lightning's Trainer arguments of the same
    names and meaning).

    Attributes:
        gradient_clip_val: Clip each member's gradients to this norm (or value); None or 0:
            no clipping.
        gradient_clip_algorithm: "norm" (the 2-norm over the member's parameters) or "value".
        accumulate_grad_batches: Batches whose gradients add up before each step.
    """

    gradient_clip_val: float | None = None
    gradient_clip_algorithm: str = "norm"
    accumulate_grad_batches: int = 1

    @classmethod
    def from_trainer(cls, trainer: Mapping[str, Any]) -> StepOptions:
        """The options of a Trainer config (a mapping of Trainer arguments)."""
        return cls(
            gradient_clip_val=trainer.get("gradient_clip_val"),
            gradient_clip_algorithm=trainer.get("gradient_clip_algorithm") or "norm",
            accumulate_grad_batches=int(trainer.get("accumulate_grad_batches") or 1),
        )

    def __post_init__(self) -> None:
        if self.gradient_clip_algorithm not in ("norm", "value"):
            raise ValueError(
                f"gradient_clip_algorithm={self.gradient_clip_algorithm!r}: "
                "allowed are 'norm' and 'value'"
            )
        if self.accumulate_grad_batches < 1:
            raise ValueError(
                f"accumulate_grad_batches={self.accumulate_grad_batches}: must be at least 1"
            )

    def clip(self, members: Sequence[TaskModule], indices: Sequence[int]) -> None:
        """Clip the gradients of each listed member over its own trainable parameters, as
        Lightning clips a run alone (no host read: torch clips with a device-side factor)."""
        value = self.gradient_clip_val
        if value is None or value <= 0:
            return
        for k in indices:
            params = members[k].trainable_parameters()
            if self.gradient_clip_algorithm == "value":
                torch.nn.utils.clip_grad_value_(params, clip_value=value)
            else:
                torch.nn.utils.clip_grad_norm_(params, value)


class MemberScalers:
    """fp16 loss scaling per member: one `GradScaler` each, in place of the pass's one.

    A run alone under `precision="16-mixed"` scales its loss by its scaler's factor, unscales
    its gradients before clipping, skips a step whose gradients are not finite and updates
    the factor after each step. One scaler for a pass would skip every member's step when one
    member overflows, and move one factor for all: here each member keeps its own, and the
    pass's precision plugin keeps only its autocast.
    """

    def __init__(self) -> None:
        self.scalers: list[torch.amp.GradScaler] = []
        self._states: list[dict[str, Any]] = []

    def __bool__(self) -> bool:
        return bool(self.scalers)

    def take_over(self, plugin: Any, size: int) -> None:
        """Give each of `size` members a copy of the plugin's fresh scaler and take the
        plugin's away (its autocast stays). Nothing happens without an enabled scaler."""
        scaler = getattr(plugin, "scaler", None)
        if not isinstance(scaler, torch.amp.GradScaler) or not scaler.is_enabled():
            return
        self.scalers = [copy.deepcopy(scaler) for _ in range(size)]
        plugin.scaler = None
        for member_scaler, state in zip(self.scalers, self._states, strict=False):
            member_scaler.load_state_dict(state)
        self._states = []

    def scale(self, losses: torch.Tensor, indices: Sequence[int]) -> torch.Tensor:
        """Each listed member's loss times its own scale factor, `[K_active]`."""
        if not self.scalers:
            return losses
        return torch.stack(
            [self.scalers[k].scale(loss) for k, loss in zip(indices, losses.unbind(0), strict=True)]
        )

    def step(
        self,
        optimizers: Sequence[torch.optim.Optimizer],
        members: Sequence[TaskModule],
        indices: Sequence[int],
        steps: StepOptions,
    ) -> None:
        """Member by member, as Lightning steps a run alone: unscale, clip, step unless the
        gradients overflowed (the scaler reads that on the host, as it does alone), update."""
        for k in indices:
            scaler, optimizer = self.scalers[k], optimizers[k]
            scaler.unscale_(optimizer)
            steps.clip(members, [k])
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)

    def state_dict(self) -> list[dict[str, Any]]:
        """The scalers' states, for a checkpoint."""
        return [scaler.state_dict() for scaler in self.scalers]

    def load_state_dict(self, states: list[dict[str, Any]]) -> None:
        """States from a checkpoint: loaded now, or when `take_over` makes the scalers."""
        if self.scalers:
            for scaler, state in zip(self.scalers, states, strict=True):
                scaler.load_state_dict(state)
        else:
            self._states = list(states)
