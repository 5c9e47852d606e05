"""Fake CUDA: run modules on tensors that live on `cuda:0`, on a machine without a GPU.

Under torch's `FakeTensorMode` every tensor carries a device, shape and dtype but no data.
Moving a module to `cuda:0` inside the mode gives it fake CUDA parameters and buffers, and
every op checks its inputs' devices as a real GPU would:

- a CPU tensor mixed into CUDA work (one a module built on the host and kept outside its
  parameters and buffers, or one a step creates without `device=`) fails with "FakeTensor is
  wrapped to wrong device, found cpu, expected cuda:0";
- a host read of a device value (`.item()`, `.tolist()`, `if tensor:`) fails with
  `DataDependentOutputException`, since a fake tensor has no value to read.

What it cannot run is the autograd engine's backward: the engine starts a thread per CUDA
device and asks the driver for it ("hasPrimaryContext expects a valid device index"). The
tests stand in for backward by giving every trainable parameter a fake gradient, so the
optimizer's step still runs on fake CUDA tensors; that backward itself keeps every gradient on
its parameter's device is autograd's own guarantee, checked on a real GPU by bench/gpu_check.py.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

CUDA = torch.device("cuda", 0)


@contextmanager
def fake_cuda() -> Iterator[FakeTensorMode]:
    """Fake tensors with deterministic algorithms on, as every trainer config of ours sets
    them (`deterministic: true` or `warn`): torchmetrics then counts classes without
    `bincount`, whose output size depends on the data."""
    was = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            yield mode
    finally:
        torch.use_deterministic_algorithms(was, warn_only=warn_only)


def to_fake_cuda(module: nn.Module) -> nn.Module:
    """Move a module built on the host to fake `cuda:0`, as Lightning's `module.to(device)`
    moves it (call inside `fake_cuda()`)."""
    module.to(CUDA)
    for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
        assert isinstance(tensor, FakeTensor) and tensor.device == CUDA, name
    return module


def on_cuda(*tensors: torch.Tensor) -> bool:
    """Whether every tensor is a fake tensor on `cuda:0`."""
    return all(isinstance(t, FakeTensor) and t.device == CUDA for t in tensors)


def fake_backward(parameters: list[nn.Parameter]) -> Callable[[torch.Tensor], None]:
    """A stand-in for `loss.backward()` (see the module docstring): checks the loss is a
    scalar on the device and gives each trainable parameter a gradient of its own shape,
    device and dtype."""

    def backward(loss: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        assert on_cuda(loss) and loss.dim() == 0, loss
        for parameter in parameters:
            parameter.grad = torch.ones_like(parameter)

    return backward


def cuda_batch(inputs_shape: tuple[int, ...], num_classes: int | None) -> tuple[torch.Tensor, ...]:
    """A fake `cuda:0` batch, as Lightning transfers one: float inputs and int64 labels (or
    float targets `[B, num_outputs]` for regression, given as a negative `num_classes`)."""
    inputs = torch.randn(inputs_shape, device=CUDA)
    if num_classes is None:
        raise ValueError("give num_classes (or -outputs for regression targets)")
    if num_classes < 0:
        return inputs, torch.randn(inputs_shape[0], -num_classes, device=CUDA)
    return inputs, torch.randint(0, num_classes, (inputs_shape[0],), device=CUDA)
