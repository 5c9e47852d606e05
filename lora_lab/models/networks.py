"""Plain `nn.Module` networks used by the studies (no Lightning here).

Layer names are part of the user interface: LoRA targets (`lora.target_modules`), adapter keys
(`base_model.model.<name>.lora_A.weight`) and the analysis tables all use them.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch
from torch import nn


class MLP(nn.Module):
    """Multi-layer perceptron classifier: flatten → (Linear → ReLU → Dropout)* → Linear head.

    The default is the 784→64→64→10 network of the classic LoRA-from-scratch notebook.
    Layers are named `hidden.0`, `hidden.1`, … and `head`.

    Args:
        input_shape: Shape of one input example, e.g. `[1, 28, 28]`; its product is the input
            width.
        num_classes: Output width.
        hidden_sizes: Widths of the hidden layers.
        dropout: Dropout probability after each hidden activation. `nn.Dropout` is a module,
            so it is active in `train()` mode only (unlike a bare `F.dropout(x, p)` call, whose
            `training` flag defaults to True).
    """

    def __init__(
        self,
        input_shape: Sequence[int] = (1, 28, 28),
        num_classes: int = 10,
        hidden_sizes: Sequence[int] = (64, 64),
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        widths = [math.prod(input_shape), *hidden_sizes]
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in itertools.pairwise(widths))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.head = nn.Linear(widths[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map inputs `[B, *input_shape]` to logits `[B, num_classes]`."""
        x = x.flatten(1)
        for layer in self.hidden:
            x = self.dropout(torch.relu(layer(x)))
        return self.head(x)


class ConvNet(nn.Module):
    """LeNet-style ConvNet: conv C→6 5×5, pool, conv 6→16 5×5, pool, FC →120→84→classes.

    Layers are named `conv1`, `conv2`, `fc1`, `fc2` and `head`. The input channels C and the
    flattened width are derived from `input_shape`, so one network serves 3×32×32 CIFAR-10
    (FC 400→120) and 1×28×28 Fashion-MNIST (FC 256→120) with no special case.

    Args:
        input_shape: `[channels, height, width]` of one input image.
        num_classes: Output width.
        channels: Output channels of the two conv layers.
        fc_sizes: Widths of the two hidden fully connected layers.
        dropout: Dropout probability after each hidden FC activation (train mode only).
    """

    def __init__(
        self,
        input_shape: Sequence[int] = (3, 32, 32),
        num_classes: int = 10,
        channels: Sequence[int] = (6, 16),
        fc_sizes: Sequence[int] = (120, 84),
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if len(input_shape) != 3:
            raise ValueError(
                f"ConvNet input_shape={list(input_shape)} is not [channels, height, width]"
            )
        in_channels, height, width = input_shape
        self.conv1 = nn.Conv2d(in_channels, channels[0], 5)
        self.conv2 = nn.Conv2d(channels[0], channels[1], 5)
        self.pool = nn.MaxPool2d(2)
        # Two (5×5 valid conv, 2×2 pool) blocks: each maps a side s to (s - 4) // 2.
        side_h, side_w = ((height - 4) // 2 - 4) // 2, ((width - 4) // 2 - 4) // 2
        if side_h < 1 or side_w < 1:
            raise ValueError(f"ConvNet input_shape={list(input_shape)} is too small; need ≥ 16×16")
        self.fc1 = nn.Linear(channels[1] * side_h * side_w, fc_sizes[0])
        self.fc2 = nn.Linear(fc_sizes[0], fc_sizes[1])
        self.head = nn.Linear(fc_sizes[1], num_classes)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map images `[B, C, H, W]` to logits `[B, num_classes]`."""
        x = self.pool(torch.relu(self.conv1(x)))
        x = self.pool(torch.relu(self.conv2(x)))
        x = x.flatten(1)
        x = self.dropout(torch.relu(self.fc1(x)))
        x = self.dropout(torch.relu(self.fc2(x)))
        return self.head(x)


class LinearMap(nn.Module):
    """A bias-free linear map `y = x Wᵀ` (d_in → d_out) for the linear-shift task.

    The single layer is named `linear`, so its weight `[d_out, d_in]` is directly the θᵀ of
    the task and the LoRA update ΔW can be compared with the true update.
    """

    def __init__(self, d_in: int = 1001, d_out: int = 1000) -> None:
        super().__init__()
        self.linear = nn.Linear(d_in, d_out, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map `[B, d_in]` to `[B, d_out]`."""
        return self.linear(x)
