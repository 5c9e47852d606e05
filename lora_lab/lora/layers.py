"""The LoRA layer base class and the wrappers for `nn.Linear` and `nn.Conv2d`.

Each wrapper holds the original layer as `base_layer` (same Parameter objects, frozen) plus the
low-rank factors A and B, named and shaped as in HF PEFT's `peft/tuners/lora/layer.py` so that
state dicts line up with PEFT files:

- Linear: `lora_A` = Linear(in, r) with weight [r, in], `lora_B` = Linear(r, out) weight [out, r].
- Conv2d: `lora_A` = Conv2d(in, r, kernel, stride, padding, dilation) weight [r, in, kh, kw],
  `lora_B` = 1x1 Conv2d(r, out) weight [out, r, 1, 1], so r is the true rank of ΔW.
- Embedding (`lora_lab.lora.embedding`): Parameters `lora_embedding_A` [r, num_embeddings]
  (zeros) and `lora_embedding_B` [embedding_dim, r] (normal).

Merging is explicit (`merge` / `unmerge`), never tied to `train()` / `eval()`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

SUPPORTED_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv2d, nn.Embedding)


class LoRALayer(nn.Module):
    """Base class: a frozen `base_layer` plus a rank-r update ΔW = B·A·scaling.

    Merging keeps the pre-merge weight tensor in the non-persistent buffer `premerge_weight`,
    so that `unmerge` restores the exact original bits (W + ΔW - ΔW in floating point is not W).
    The price is one extra copy of the base weight per merged layer; `unload_lora` drops it.

    Attributes:
        base_layer: The wrapped layer; its parameters have requires_grad=False.
        rank: The rank r.
        alpha: The scale numerator.
        scaling: alpha/r, or alpha/sqrt(r) with rsLoRA.
        merged: Whether ΔW is currently added into `base_layer.weight`.
        method: "lora" here; "dora" and "pissa" in the subclasses of `lora_lab.lora.dora` and
            `lora_lab.lora.pissa`.
    """

    method: str = "lora"
    base_layer: nn.Module
    premerge_weight: torch.Tensor | None

    def __init__(self, base_layer: nn.Module, rank: int, alpha: float, use_rslora: bool) -> None:
        super().__init__()
        self.base_layer = base_layer
        for param in base_layer.parameters():
            param.requires_grad_(False)
        self.rank = rank
        self.alpha = alpha
        self.use_rslora = use_rslora
        self.scaling = alpha / math.sqrt(rank) if use_rslora else alpha / rank
        self.merged = False
        self.lora_dropout: nn.Module = nn.Identity()
        self._has_dropout = False
        # Not persistent: state dicts keep PEFT's layout; a buffer still follows .to(device).
        self.register_buffer("premerge_weight", None, persistent=False)

    def configure(self, alpha: float, dropout: float, use_rslora: bool) -> None:
        """Set the scale and dropout without touching the factors (used by a hot swap)."""
        self.alpha = alpha
        self.use_rslora = use_rslora
        self.scaling = alpha / math.sqrt(self.rank) if use_rslora else alpha / self.rank
        self._set_dropout(dropout)

    def _set_dropout(self, dropout: float) -> None:
        # nn.Identity when p == 0, and forward skips calling it (one module call less).
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self._has_dropout = dropout > 0

    def adapter_tensors(self) -> dict[str, nn.Parameter]:
        """The adapter parameters by their name inside this layer (PEFT's key suffixes)."""
        raise NotImplementedError

    def adapter_parameters(self) -> list[nn.Parameter]:
        """The trainable adapter parameters, collected explicitly (not by name matching)."""
        return list(self.adapter_tensors().values())

    def delta_weight(self) -> torch.Tensor:
        """ΔW = B·A·scaling in float32, shaped like `base_layer.weight`."""
        raise NotImplementedError

    def reset_adapter(self, init: str) -> None:
        """Initialise A and B so that ΔW = 0 (init: "kaiming" or "gaussian")."""
        raise NotImplementedError

    def merged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """The weight that merging puts in place of the unmerged base weight `weight`.

        Args:
            weight: The unmerged base weight in fp32, shaped like `base_layer.weight`.

        Returns:
            W + ΔW in fp32 (DoRA rescales it, see `lora_lab.lora.dora`).
        """
        return weight + self.delta_weight()

    def unmerged_weight(self) -> torch.Tensor:
        """The base weight without this adapter merged in (the saved copy while merged)."""
        if self.merged:
            assert self.premerge_weight is not None
            return self.premerge_weight
        return self.base_layer.weight

    def effective_delta_weight(self) -> torch.Tensor:
        """What the adapter adds to the pretrained weight, in fp32, shaped like the weight.

        B·A·scaling for LoRA; DoRA and PiSSA override it (their ΔW is not B·A·scaling).
        """
        return self.delta_weight()

    def restore_base(self) -> None:
        """Put the pretrained weight back before the wrapper is removed (PiSSA changes it)."""

    def merge(self) -> None:
        """Merge the adapter into the base weight (idempotent), computed in fp32, cast back."""
        if self.merged:
            return
        weight = self.base_layer.weight
        # An enclosing autocast region (bf16-mixed training) would run B@A in low precision.
        with torch.no_grad(), torch.autocast(weight.device.type, enabled=False):
            original = weight.data
            merged = self.merged_weight(original.float()).to(original.dtype)
            self.premerge_weight = original
            weight.data = merged
        self.merged = True

    def unmerge(self) -> None:
        """Restore the exact pre-merge base weight (idempotent)."""
        if not self.merged:
            return
        assert self.premerge_weight is not None
        self.base_layer.weight.data = self.premerge_weight
        self.premerge_weight = None
        self.merged = False

    def merged_base_layer(self) -> nn.Module:
        """Return `base_layer` carrying W + ΔW and forget the saved copy (used by unload)."""
        if not self.merged:
            self.merge()
        self.premerge_weight = None
        self.merged = False
        return self.base_layer

    def extra_repr(self) -> str:
        return (
            f"method={self.method}, rank={self.rank}, alpha={self.alpha}, "
            f"scaling={self.scaling:.4g}, merged={self.merged}"
        )


class LoRALinear(LoRALayer):
    """LoRA around an `nn.Linear`: y = base(x) + B(A(dropout(x))) · scaling.

    Args:
        base_layer: The layer to adapt, weight [out, in]. Frozen, not copied.
        rank: r; A weight is [r, in], B weight is [out, r].
        alpha: Scale numerator.
        dropout: Dropout on the adapter input only.
        use_rslora: Scale by alpha/sqrt(r) instead of alpha/r.
        init: "kaiming" or "gaussian" init of A; B starts at zero.
    """

    def __init__(
        self,
        base_layer: nn.Linear,
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        use_rslora: bool = False,
        init: str = "kaiming",
    ) -> None:
        super().__init__(base_layer, rank, alpha, use_rslora)
        weight = base_layer.weight
        factory = {"device": weight.device, "dtype": weight.dtype}
        self.lora_A = nn.Linear(base_layer.in_features, rank, bias=False, **factory)
        self.lora_B = nn.Linear(rank, base_layer.out_features, bias=False, **factory)
        self._set_dropout(dropout)
        self.reset_adapter(init)

    def adapter_tensors(self) -> dict[str, nn.Parameter]:
        return {"lora_A.weight": self.lora_A.weight, "lora_B.weight": self.lora_B.weight}

    def reset_adapter(self, init: str) -> None:
        _init_a(self.lora_A.weight, init, self.rank)
        nn.init.zeros_(self.lora_B.weight)

    def delta_weight(self) -> torch.Tensor:
        """ΔW [out, in] = B [out, r] @ A [r, in] · scaling, in fp32."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x [..., in]. Returns: [..., out]."""
        result = self.base_layer(x)
        if self.merged:
            return result
        if self._has_dropout:
            x = self.lora_dropout(x)
        hidden = F.linear(x, self.lora_A.weight)  # [..., r]
        # One fused GEMM computes result + scaling · hidden @ Bᵀ: no separate scale and add passes.
        out_2d = torch.addmm(
            result.reshape(-1, result.shape[-1]),
            hidden.reshape(-1, self.rank),
            self.lora_B.weight.t(),
            alpha=self.scaling,
        )
        return out_2d.view(result.shape)


class LoRAConv2d(LoRALayer):
    """LoRA around an `nn.Conv2d`: y = base(x) + B(A(dropout(x))) · scaling.

    A has the base kernel's geometry (kernel, stride, padding, dilation, padding mode) and maps
    in -> r channels; B is a 1x1 conv r -> out. So ΔW [out, in, kh, kw] = B·A has rank <= r.

    Args:
        base_layer: The conv to adapt. Grouped convs (groups > 1) are refused.
        rank: r; A weight [r, in, kh, kw], B weight [out, r, 1, 1].
        alpha: Scale numerator.
        dropout: Dropout on the adapter input only.
        use_rslora: Scale by alpha/sqrt(r) instead of alpha/r.
        init: "kaiming" or "gaussian" init of A; B starts at zero.

    Raises:
        ValueError: If `base_layer.groups > 1`.
    """

    def __init__(
        self,
        base_layer: nn.Conv2d,
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        use_rslora: bool = False,
        init: str = "kaiming",
    ) -> None:
        check_conv_supported(base_layer)
        super().__init__(base_layer, rank, alpha, use_rslora)
        weight = base_layer.weight
        factory = {"device": weight.device, "dtype": weight.dtype}
        self.lora_A = nn.Conv2d(
            base_layer.in_channels,
            rank,
            base_layer.kernel_size,
            stride=base_layer.stride,
            padding=base_layer.padding,  # type: ignore[arg-type]  # may be "same"/"valid"
            dilation=base_layer.dilation,
            padding_mode=base_layer.padding_mode,
            bias=False,
            **factory,
        )
        self.lora_B = nn.Conv2d(rank, base_layer.out_channels, 1, bias=False, **factory)
        self._set_dropout(dropout)
        self.reset_adapter(init)

    def adapter_tensors(self) -> dict[str, nn.Parameter]:
        return {"lora_A.weight": self.lora_A.weight, "lora_B.weight": self.lora_B.weight}

    def reset_adapter(self, init: str) -> None:
        _init_a(self.lora_A.weight, init, self.rank)
        nn.init.zeros_(self.lora_B.weight)

    def delta_weight(self) -> torch.Tensor:
        """ΔW [out, in, kh, kw] = (B [out, r] @ A [r, in·kh·kw]) · scaling, in fp32."""
        b_matrix = self.lora_B.weight.float().squeeze(-1).squeeze(-1)
        a_matrix = self.lora_A.weight.float().flatten(1)
        return (b_matrix @ a_matrix).view(self.base_layer.weight.shape) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x [N, in, H, W]. Returns: [N, out, H', W']."""
        result = self.base_layer(x)
        if self.merged:
            return result
        if self._has_dropout:
            x = self.lora_dropout(x)
        # Scale the tiny [out, r, 1, 1] kernel rather than the large output map.
        return result + F.conv2d(self.lora_A(x), self.lora_B.weight * self.scaling)


def check_conv_supported(layer: nn.Conv2d) -> None:
    """Raise ValueError for conv layers whose LoRA we do not implement (grouped convs)."""
    if layer.groups > 1:
        raise ValueError(
            f"grouped Conv2d (groups={layer.groups}) is not supported by LoRAConv2d; "
            "exclude it from target_modules"
        )


def _init_a(weight: torch.Tensor, init: str, rank: int) -> None:
    """Initialise the A factor like PEFT: kaiming-uniform(a=√5) or normal(std=1/r)."""
    if init == "kaiming":
        nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
    elif init == "gaussian":
        nn.init.normal_(weight, std=1.0 / rank)
    else:
        raise ValueError(f"init must be 'kaiming' or 'gaussian', got {init!r}")
