"""Network weight files: plain state dicts in safetensors, read back with clear errors.

The pipeline stores `checkpoints/pretrain.safetensors` and `checkpoints/full_finetune.safetensors`
this way; `load_network_weights` also accepts a Lightning `.ckpt` whose state dict holds the
network under the `network.` prefix (what our LightningModules save).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lora_lab._atomic import atomic_path


class WeightsError(ValueError):
    """A weights file is missing, unreadable, or does not fit the network."""


def save_network_weights(network: nn.Module, path: str | Path) -> Path:
    """Write `network.state_dict()` to a safetensors file atomically (temp file + rename).

    The file gets the umask's mode (0644 under umask 022), as a plain `open` would give it.

    Args:
        network: Any module.
        path: Destination file; parent folders are created.

    Returns:
        The path written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in network.state_dict().items()}
    with atomic_path(path, fsync=True) as temp:
        save_file(state, temp)
    return path


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from `.safetensors` or a Lightning `.ckpt`, with one-line errors."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file {str(path)!r} does not exist")
    try:
        if path.suffix == ".safetensors":
            return load_file(path)
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch.load raises anything from IndexError to UnpicklingError
        text = str(error).strip()
        first_line = text.splitlines()[0] if text else type(error).__name__
        raise WeightsError(
            f"weights file {str(path)!r} is corrupt or unreadable: {first_line}"
        ) from None
    state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict):
        raise WeightsError(f"weights file {str(path)!r} holds no state dict")
    if any(key.startswith("network.") for key in state):
        state = {
            k.removeprefix("network."): v for k, v in state.items() if k.startswith("network.")
        }
    return state


def load_network_weights(network: nn.Module, path: str | Path) -> None:
    """Load weights into `network`, refusing files made for another architecture.

    Nothing is copied unless every key and shape matches, and the error names the missing,
    unexpected and mismatched keys.
    """
    state = read_weights(path)
    expected = network.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = sorted(
        f"{key} {list(state[key].shape)} vs {list(expected[key].shape)}"
        for key in set(state) & set(expected)
        if state[key].shape != expected[key].shape
    )
    problems = []
    if missing:
        problems.append(f"missing keys {missing}")
    if unexpected:
        problems.append(f"unexpected keys {unexpected}")
    if mismatched:
        problems.append(f"shape mismatches {mismatched}")
    if problems:
        raise WeightsError(
            f"weights file {str(path)!r} does not fit the {type(network).__name__} network "
            f"(another architecture?): {'; '.join(problems)}"
        )
    network.load_state_dict(state)
