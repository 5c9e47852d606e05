"""The layers of a grouped network: K members' versions of one layer, run in one call.

Activations travel in two layouts. Until the first member-specific layer they are *shared*,
`[B, ...]`, computed once for all K members. A member-specific layer returns them *folded*,
`[K·B, ...]`: member k's rows are `k·B … (k+1)·B − 1`. Folding keeps every tensor in the shape
a layer expects (a Conv2d or a pooling layer sees `[N, C, H, W]`, `flatten(1)` still flattens
one example), so the network's own forward runs unchanged between the grouped layers as long
as it treats the rows of a batch independently, which `check_grouped` verifies. A layer tells
the layouts apart by the batch size B that the network's forward received (`GroupContext`).

- `GroupedLoRALinear`: LoRA, rsLoRA, DoRA and PiSSA adapters of one `nn.Linear`, mixed freely.
  PiSSA's member-owned base `W − s·B₀A₀` is the shared pretrained W plus the fixed factors
  `[A; A₀]`, `[B, −B₀]` (a rank-2r LoRA), so no member needs its own copy of W here. DoRA's
  row norms come from the factors (shared input) or from the merged weights the folded path
  builds anyway.
- `GroupedLoRAConv2d`: plain LoRA adapters of one `nn.Conv2d`.
- `PerMember`: any other member-specific module (a DoRA Conv2d, an Embedding adapter, a
  `modules_to_save` copy, a layer with a trained bias), each member's own module run on its
  own rows; `nn.Linear` copies run as one batched matmul.

Every path computes, per member, the function its own layer computes (up to float rounding);
where that needs the layer's own forward (adapter dropout in training, autocast, a folded
Conv2d), it calls it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lora_lab.lora.dora import DoRALinear
from lora_lab.lora.layers import LoRAConv2d, LoRALayer, LoRALinear
from lora_lab.lora.pissa import PiSSALinear


class GroupingError(ValueError):
    """The networks cannot be trained as one group; the message says why, in one line."""


class GroupContext:
    """What the layers of one grouped network share: K, and the batch size B of the forward
    that is running (set by a pre-hook on the network, read by every grouped layer)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.batch: int | None = None

    def begin(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        """Forward pre-hook of the grouped network: remember B."""
        del module
        self.batch = int(args[0].shape[0])

    def unfold(self, module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> Any:
        """Forward hook of the grouped network: `[K·B, ...]` → `[K, B, ...]`."""
        del module, args
        assert self.batch is not None
        if output.shape[0] != self.size * self.batch:
            raise GroupingError(
                f"the grouped network returned {output.shape[0]} rows for {self.size} members "
                f"of {self.batch} examples; its output must depend on the adapters"
            )
        return output.unflatten(0, (self.size, self.batch))

    def folded(self, x: torch.Tensor) -> bool:
        """Whether `x` is folded `[K·B, ...]` (True) or shared `[B, ...]` (False)."""
        rows = x.shape[0]
        if self.batch is None or rows == self.batch:
            return False  # (with K = 1 both layouts are the same)
        if rows == self.size * self.batch:
            return True
        raise GroupingError(
            f"a grouped layer got {rows} rows; it takes the batch ({self.batch}) or "
            f"{self.size} members' batches ({self.size * self.batch})"
        )


def _sync_mode(modules: Sequence[nn.Module], training: bool) -> None:
    """The members' own modules follow the grouped network's train/eval mode."""
    for module in modules:
        if module.training != training:
            module.train(training)


def _each(
    modules: Sequence[nn.Module], x: torch.Tensor, folded: bool, training: bool
) -> torch.Tensor:
    """Each member's own module on its rows (or on the shared batch), folded: `[K·B, ...]`."""
    _sync_mode(modules, training)
    if not folded:
        return torch.cat([module(x) for module in modules])
    return torch.cat([m(x_k) for m, x_k in zip(modules, x.chunk(len(modules)), strict=True)])


class _GroupedLoRA(nn.Module):
    """What the grouped LoRA layers share: the members' layers, the context, the bias rule."""

    def __init__(self, layers: Sequence[LoRALayer], context: GroupContext) -> None:
        super().__init__()
        # Plain lists, not ModuleLists: the adapters live (and train) in their own networks.
        self.adapters: list[Any] = list(layers)
        self.context = context
        self.ranks = [layer.rank for layer in layers]
        self.dropouts = [
            layer.lora_dropout.p if isinstance(layer.lora_dropout, nn.Dropout) else 0.0
            for layer in layers
        ]
        bias = layers[0].base_layer.bias
        # lora.bias = all / lora_only: each member trains its own copy of the bias
        self.own_bias = bias is not None and any(
            lay.base_layer.bias.requires_grad for lay in layers
        )

    @property
    def size(self) -> int:
        """K, the number of adapters."""
        return len(self.adapters)

    @property
    def base_layer(self) -> Any:
        """The first member's frozen layer: the geometry and the shared bias. Not registered
        here (its trained bias, if any, is the member's own), so looked up each time."""
        return self.adapters[0].base_layer

    def _bias(self) -> torch.Tensor | None:
        """The bias to add to `[K, rows, out, ...]`-shaped outputs: shared or per member."""
        if not self.own_bias:
            return self.base_layer.bias
        return torch.stack([a.base_layer.bias for a in self.adapters]).unsqueeze(1)

    def _own_forward_needed(self, x: torch.Tensor) -> bool:
        # Dropout draws a mask per member on the adapter input; autocast would round a merged
        # weight W + s·BA to half precision. Both run each member's own layer.
        return (self.training and any(self.dropouts)) or torch.is_autocast_enabled(x.device.type)

    def extra_repr(self) -> str:
        return f"ranks={self.ranks}"


class GroupedLoRALinear(_GroupedLoRA):
    """K adapters of one frozen `nn.Linear`: `y_k = g_k ⊙ (x (W + s_k B_k A_k)ᵀ) + b_k`.

    `g_k` is DoRA's `m_k / ‖W + s_k B_k A_k‖` (1 for the other methods); `b_k` the shared bias,
    or member k's own when biases train; for PiSSA, `B_k A_k` is `[B, −B₀][A; A₀]`.

    Shared input `[B, ..., in]`: the base GEMM runs once, the K A factors as one GEMM with A
    concatenated to `[Σr, in]`. Folded input `[K·B, ..., in]`: each member's merged weight is
    formed (one bmm of the rank-padded factors) and one bmm computes all K outputs, whatever
    the ranks: B·in·out work per member instead of the base GEMM plus B·r·(in + out).

    Args:
        layers: The K members' layers (`LoRALinear`, `DoRALinear` or `PiSSALinear`), all on
            the same pretrained weight. Their Parameters are used, not copied.
        context: The grouped network's context.
    """

    def __init__(self, layers: Sequence[LoRALinear], context: GroupContext) -> None:
        super().__init__(layers, context)
        self.pissa = [isinstance(layer, PiSSALinear) for layer in layers]
        self.dora = [isinstance(layer, DoRALinear) for layer in layers]
        # PiSSA's factors carry the frozen [A₀; −B₀] too: rank 2r in the shared maths.
        self.widths = [2 * r if p else r for r, p in zip(self.ranks, self.pissa, strict=True)]

    def _weight(self) -> torch.Tensor:
        """The shared pretrained W `[out, in]` (a PiSSA layer's base holds its residual)."""
        first = self.adapters[0]
        return first.pretrained_weight if self.pissa[0] else first.base_layer.weight

    def _factors(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Member k's (A `[w, in]`, B `[out, w]`), PiSSA's with its fixed initial factors."""
        a = self.adapters[k]
        if not self.pissa[k]:
            return a.lora_A.weight, a.lora_B.weight
        return (
            torch.cat([a.lora_A.weight, a.pissa_initial_A]),
            torch.cat([a.lora_B.weight, -a.pissa_initial_B], dim=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x `[B, ..., in]` (shared) or `[K·B, ..., in]` (folded).

        Returns: `[K·B, ..., out]`.
        """
        folded = self.context.folded(x)
        if self._own_forward_needed(x):
            return _each(self.adapters, x, folded, self.training)
        if folded:
            return self._forward_folded(x)
        return self._forward_shared(x)

    def _forward_shared(self, x: torch.Tensor) -> torch.Tensor:
        weight = self._weight()
        flat = x.reshape(-1, x.shape[-1])
        base = F.linear(flat, weight)  # [N, out], once for all members
        factors = [self._factors(k) for k in range(self.size)]
        # Zero rows up to a multiple of 16: MKL runs [B, 784] @ [784, 128] ~25% faster than
        # with 127 columns. They only add unused output columns.
        pad = -sum(self.widths) % 16
        a_cat = torch.cat([*(a for a, _ in factors), flat.new_zeros(pad, flat.shape[1])])
        hidden = F.linear(flat, a_cat).split([*self.widths, pad], dim=1)
        outputs = []
        for k, (h, (a, b)) in enumerate(zip(hidden, factors, strict=False)):
            # The same fused GEMM as LoRALinear.forward, so each output is computed as alone.
            out = torch.addmm(base, h, b.t(), alpha=self.adapters[k].scaling)
            if self.dora[k]:
                out = out * self._dora_scale_from_factors(k, weight, a, b)
            outputs.append(out)
        stacked = torch.stack(outputs)  # [K, N, out]
        bias = self._bias()
        if bias is not None:
            stacked = stacked + bias
        return stacked.view(self.size * x.shape[0], *x.shape[1:-1], stacked.shape[-1])

    def _dora_scale_from_factors(
        self, k: int, weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor
    ) -> torch.Tensor:
        """DoRA's `m / ‖W + s·BA‖` `[out]` without forming W + s·BA: row i's squared norm is
        `‖W_i‖² + 2s·Σ_r B_ir (W Aᵀ)_ir + s²·Σ_r (B AAᵀ)_ir B_ir` (detached, DoRA §4.3)."""
        s = self.adapters[k].scaling
        with torch.no_grad():
            a, b = a.detach(), b.detach()
            square = weight.square().sum(1) + 2 * s * (b * (weight @ a.t())).sum(1)
            square = square + s * s * ((b @ (a @ a.t())) * b).sum(1)
            norm = square.clamp_min(0).sqrt()
        return self.adapters[k].lora_magnitude_vector / norm

    def _forward_folded(self, x: torch.Tensor) -> torch.Tensor:
        stacked = x.reshape(self.size, -1, x.shape[-1])  # [K, N, in]
        weights = self._weight() + self._deltas()  # [K, out, in]
        if any(self.dora):
            weights = weights * self._dora_scales(weights).unsqueeze(-1)
        bias = self._bias()
        if bias is None:
            out = torch.bmm(stacked, weights.transpose(1, 2))
        else:
            out = torch.baddbmm(bias, stacked, weights.transpose(1, 2))  # [K, N, out]
        return out.view(*x.shape[:-1], out.shape[-1])

    def _dora_scales(self, weights: torch.Tensor) -> torch.Tensor:
        """`[K, out]`: DoRA's `m / ‖W + s·BA‖` from the merged weights, 1 for other members."""
        norms = weights.detach().norm(dim=2)  # [K, out]
        ones = torch.ones_like(norms[0])
        return torch.stack(
            [
                a.lora_magnitude_vector / norms[k] if self.dora[k] else ones
                for k, a in enumerate(self.adapters)
            ]
        )

    def _deltas(self) -> torch.Tensor:
        """`s_k · B_k A_k` of every member, `[K, out, in]`, as one bmm.

        The factors are concatenated (one op each, whatever K) and laid out with their widths
        zero-padded to the largest, `A [K, R, in]` and `B [K, out, R]`; the zero rows add
        exact zeros. A per-adapter `B_k @ A_k` was ~6 autograd ops per adapter and layer, the
        most numerous ops of a fused step; the padded FLOPs (K·R·out·in) stay far below the
        bmm of the activations that uses the deltas whenever the batch exceeds R.
        """
        largest, size = max(self.widths), self.size
        index, scaling = self._layout(self._weight())
        factors = [self._factors(k) for k in range(size)]
        a_cat = torch.cat([a for a, _ in factors])  # [Σw, in]
        b_cat = torch.cat([b for _, b in factors], dim=1) * scaling  # [out, Σw]
        a_pad = a_cat.new_zeros(size * largest, a_cat.shape[1]).index_copy(0, index, a_cat)
        b_pad = b_cat.new_zeros(b_cat.shape[0], size * largest).index_copy(1, index, b_cat)
        b_pad = b_pad.view(-1, size, largest).transpose(0, 1)  # [K, out, R]
        return torch.bmm(b_pad, a_pad.view(size, largest, -1))

    def _layout(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Where each concatenated rank goes in the padded layout, and each one's scaling."""
        key = (weight.device, weight.dtype, tuple(a.scaling for a in self.adapters))
        if getattr(self, "_layout_key", None) != key:
            largest = max(self.widths)
            index = [k * largest + j for k, width in enumerate(self.widths) for j in range(width)]
            scaling = [
                a.scaling
                for a, width in zip(self.adapters, self.widths, strict=True)
                for _ in range(width)
            ]
            self._layout_cache = (
                torch.tensor(index, device=weight.device),
                torch.tensor(scaling, device=weight.device, dtype=weight.dtype),
            )
            self._layout_key = key
        return self._layout_cache


class GroupedLoRAConv2d(_GroupedLoRA):
    """K plain LoRA adapters of one frozen `nn.Conv2d`: `y_k = conv(x, W) + conv1x1(A_k(x),
    s_k B_k) (+ b_k)`.

    Shared input `[B, C, H, W]`: the base convolution runs once and the K A kernels as one
    convolution with `[Σr, C, kh, kw]`. Folded input: each member's own layer on its rows.

    Args:
        layers: The K members' `LoRAConv2d` layers on the same pretrained weight.
        context: The grouped network's context.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x `[B, C, H, W]` (shared) or `[K·B, C, H, W]`. Returns: `[K·B, out, H', W']`."""
        folded = self.context.folded(x)
        if folded or self._own_forward_needed(x):
            return _each(self.adapters, x, folded, self.training)
        base_layer = self.base_layer
        base = base_layer._conv_forward(x, base_layer.weight, None)  # [B, out, H', W']
        first = self.adapters[0].lora_A  # the base kernel's geometry, rank aside
        kernels = torch.cat([a.lora_A.weight for a in self.adapters])  # [Σr, C, kh, kw]
        hidden = first._conv_forward(x, kernels, None).split(self.ranks, dim=1)
        stacked = torch.stack(
            [
                base + F.conv2d(h, a.lora_B.weight * a.scaling)
                for h, a in zip(hidden, self.adapters, strict=True)
            ]
        )  # [K, B, out, H', W']
        bias = self._bias()
        if bias is not None:
            stacked = stacked + bias.view(*bias.shape[:-1], -1, 1, 1)
        return stacked.flatten(0, 1)


class PerMember(nn.Module):
    """Member k's own module on member k's rows, for any member-specific module.

    Args:
        modules: The K members' modules at one name (not copied; they train in their own
            networks).
        context: The grouped network's context.
    """

    def __init__(self, modules: Sequence[nn.Module], context: GroupContext) -> None:
        super().__init__()
        self.modules_of: list[nn.Module] = list(modules)  # plain list: not this module's
        self.context = context
        self.linear = all(type(m) is nn.Linear for m in modules)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x `[B, ...]` (shared) or `[K·B, ...]` (folded). Returns: `[K·B, ...]`."""
        folded = self.context.folded(x)
        if not self.linear:
            return _each(self.modules_of, x, folded, self.training)
        # Trained Linear copies (a head in modules_to_save): one batched matmul for all K.
        size = len(self.modules_of)
        rows = x.reshape(size if folded else 1, -1, x.shape[-1])
        weights = torch.stack([m.weight for m in self.modules_of]).transpose(1, 2)
        biases = [m.bias for m in self.modules_of]
        if any(b is None for b in biases):
            out = torch.matmul(rows, weights)
        else:
            out = torch.baddbmm(
                torch.stack(biases).unsqueeze(1), rows.expand(size, -1, -1), weights
            )
        batch = x.shape[0] // size if folded else x.shape[0]
        return out.reshape(size * batch, *x.shape[1:-1], out.shape[-1])


def grouped_layer(layers: Sequence[nn.Module], context: GroupContext) -> nn.Module:
    """The grouped form of the members' layers at one name: the specialised LoRA layers
    where every member's layer is of a kind they handle, else `PerMember`."""
    kinds = {type(layer) for layer in layers}
    if kinds <= {LoRALinear, DoRALinear, PiSSALinear}:
        return GroupedLoRALinear(layers, context)  # type: ignore[arg-type]
    if kinds == {LoRAConv2d}:
        return GroupedLoRAConv2d(layers, context)  # type: ignore[arg-type]
    return PerMember(layers, context)
