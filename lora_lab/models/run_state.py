"""What a training run keeps beside its weights, the same way in every module: the dtype of its
per-epoch sums on a device, and the random generators' states in a checkpoint."""

from __future__ import annotations

from typing import Any

import torch


def sum_dtype(device: torch.device) -> torch.dtype:
    """The dtype of per-epoch sums on `device`: float64, where the device has it (MPS lacks
    it)."""
    return torch.float32 if device.type == "mps" else torch.float64


def save_rng_state(checkpoint: dict[str, Any], device: torch.device) -> None:
    """Keep the random generators' states in a checkpoint.

    Dropout draws from torch's global generator, and on a GPU from the generator of the
    module's own device: with their states, a resumed run draws the same masks as an
    uninterrupted one (the data order is fixed by seed and epoch). Only the module's device is
    kept: under DDP every process seeds alike and draws alike on its own device, so rank 0's
    device state is every rank's, while the other devices rank 0 can see were never drawn from.
    """
    checkpoint["torch_rng_state"] = torch.get_rng_state()
    if device.type == "cuda":
        checkpoint["cuda_rng_state"] = torch.cuda.get_rng_state(device)


def restore_rng_state(checkpoint: dict[str, Any], device: torch.device) -> None:
    """Give the random generators the states `save_rng_state` kept (those present); the CUDA
    state goes to the module's own device."""
    state = checkpoint.get("torch_rng_state")
    if state is not None:
        torch.set_rng_state(state)
    cuda_state = checkpoint.get("cuda_rng_state")
    if isinstance(cuda_state, torch.Tensor) and device.type == "cuda":
        torch.cuda.set_rng_state(cuda_state, device)
