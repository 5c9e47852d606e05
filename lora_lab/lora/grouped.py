"""Run K LoRA adapters of one frozen network in a single forward pass.

K copies of a network carry different adapters (ranks, scalings, inits) on the same frozen
base. `group_networks` builds one network that computes all K outputs at once: each
`LoRALinear` is replaced by a `GroupedLoRALinear` that reads the K adapters' own `lora_A` /
`lora_B` Parameters, so gradients land on the original adapters and every adapter's optimizer,
`save_adapter` and `count_parameters` work on its own network as before.

Activations are shared until the first adapted layer ([B, ...], computed once) and stacked
after it ([K, B, ...]): the network's own forward runs unchanged as long as the ops between its
layers act elementwise or on the last dimension (ReLU, dropout, frozen Linear layers), which
`check_grouped` verifies on a probe batch against the K networks run one by one.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from lora_lab.lora.inject import lora_layers, set_submodule
from lora_lab.lora.layers import LoRALayer, LoRALinear


class GroupingError(ValueError):
    """The networks cannot be trained as one group; the message says why, in one line."""


class GroupedLoRALinear(nn.Module):
    """K LoRA adapters on one frozen `nn.Linear`: `y_k = base(x) + s_k · B_k A_k drop_k(x)`.

    Shared input `[B, in]` (nothing adapted upstream): the base output is computed once, and
    the K A factors run as one GEMM with A concatenated to `[Σr, in]`, split per adapter after.
    Stacked input `[K, B, in]`: each adapter's merged weight `W + s_k B_k A_k` is formed (tiny
    GEMMs) and one `bmm` computes all K outputs, whatever the ranks. That is the same function,
    costs B·in·out per adapter instead of the base GEMM plus B·r·(in + out) for the factors, and
    needs no padding of ranks to the largest (a zero-padded factor `bmm` did ~3.5x the work
    of a 1…64 sweep and ran slower than per-adapter GEMMs). With dropout the factors must see
    the dropped input, so they run per adapter, with masks drawn independently per adapter.

    Args:
        layers: The K adapters, all wrapping layers with the same weights. Their Parameters
            are used, not copied.
        base_layer: The frozen layer to compute the base output with; defaults to the first
            adapter's.
    """

    def __init__(self, layers: Sequence[LoRALinear], base_layer: nn.Linear | None = None) -> None:
        super().__init__()
        self.base_layer = base_layer if base_layer is not None else layers[0].base_layer
        # Plain lists, not ModuleLists: the adapters live (and train) in their own networks.
        self.adapters: list[LoRALinear] = list(layers)
        self.ranks = [layer.rank for layer in layers]
        self.dropouts = [
            layer.lora_dropout.p if isinstance(layer.lora_dropout, nn.Dropout) else 0.0
            for layer in layers
        ]

    @property
    def size(self) -> int:
        """K, the number of adapters."""
        return len(self.adapters)

    def _dropped(self, x: torch.Tensor, index: int) -> torch.Tensor:
        probability = self.dropouts[index]
        if not self.training or probability == 0.0:
            return x
        return F.dropout(x, probability, training=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x `[B, in]` (shared) or `[K, B, in]` (stacked). Returns: `[K, B, out]`."""
        if x.dim() == 2:
            return self._forward_shared(x)
        if x.dim() == 3 and x.shape[0] == self.size:
            return self._forward_stacked(x)
        raise GroupingError(
            f"grouped LoRA layer got input of shape {list(x.shape)}; it takes [B, in] or "
            f"[K={self.size}, B, in]"
        )

    def _forward_shared(self, x: torch.Tensor) -> torch.Tensor:
        base = self.base_layer(x)  # [B, out], once for all adapters
        if self.training and any(self.dropouts):
            hidden = [
                F.linear(self._dropped(x, k), a.lora_A.weight) for k, a in enumerate(self.adapters)
            ]
        else:
            weights = [a.lora_A.weight for a in self.adapters]
            # Zero rows up to a multiple of 16: MKL runs [B, 784] @ [784, 128] ~25% faster than
            # with 127 columns. They only add unused output columns.
            pad = -sum(self.ranks) % 16
            a_cat = torch.cat([*weights, x.new_zeros(pad, x.shape[-1])])  # [Σr + pad, in]
            hidden = F.linear(x, a_cat).split([*self.ranks, pad], dim=1)[: self.size]
        # The same fused GEMM as LoRALinear.forward, so each output is computed as it is alone.
        return torch.stack(
            [
                torch.addmm(base, h, a.lora_B.weight.t(), alpha=a.scaling)
                for h, a in zip(hidden, self.adapters, strict=True)
            ]
        )

    def _forward_stacked(self, x: torch.Tensor) -> torch.Tensor:
        # Under autocast the merged weight W + s·BA would be rounded to bf16/fp16, losing
        # updates below half a step of W; the factored path keeps the adapter branch apart,
        # as LoRALinear does.
        if (self.training and any(self.dropouts)) or torch.is_autocast_enabled(x.device.type):
            return self._forward_stacked_factored(x)
        # Merged form: x_k (W + s_k B_k A_k)ᵀ. The same function as base + adapter path, but one
        # bmm for all K adapters whatever their ranks, and B·in·out work per adapter instead of
        # the base GEMM plus B·r·(in + out) for the factors.
        weights = (self.base_layer.weight + self._deltas()).transpose(1, 2)  # [K, in, out]
        bias = self.base_layer.bias
        if bias is None:
            return torch.bmm(x, weights)
        return torch.baddbmm(bias, x, weights)  # [K, B, out]

    def _deltas(self) -> torch.Tensor:
        """`s_k · B_k A_k` of every adapter, `[K, out, in]`, as one bmm.

        The factors are concatenated (one op each, whatever K) and laid out with their ranks
        zero-padded to the largest, `A [K, R, in]` and `B [K, out, R]`; the zero rows add
        exact zeros. A per-adapter `B_k @ A_k` was ~6 autograd ops per adapter and layer, the
        most numerous ops of a fused step; the padded FLOPs (K·R·out·in) stay far below the
        bmm of the activations that uses the deltas whenever the batch exceeds R.
        """
        largest, size = max(self.ranks), self.size
        index, scaling = self._layout(self.base_layer.weight.device)
        a_cat = torch.cat([a.lora_A.weight for a in self.adapters])  # [Σr, in]
        b_cat = torch.cat([a.lora_B.weight for a in self.adapters], dim=1) * scaling  # [out, Σr]
        a_pad = a_cat.new_zeros(size * largest, a_cat.shape[1]).index_copy(0, index, a_cat)
        b_pad = b_cat.new_zeros(b_cat.shape[0], size * largest).index_copy(1, index, b_cat)
        b_pad = b_pad.view(-1, size, largest).transpose(0, 1)  # [K, out, R]
        return torch.bmm(b_pad, a_pad.view(size, largest, -1))

    def _layout(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Where each concatenated rank goes in the padded layout, and each one's scaling."""
        key = (device, tuple(a.scaling for a in self.adapters))
        if getattr(self, "_layout_key", None) != key:
            largest = max(self.ranks)
            index = [k * largest + j for k, rank in enumerate(self.ranks) for j in range(rank)]
            scaling = [a.scaling for a in self.adapters for _ in range(a.rank)]
            self._layout_cache = (
                torch.tensor(index, device=device),
                torch.tensor(scaling, device=device, dtype=self.base_layer.weight.dtype),
            )
            self._layout_key = key
        return self._layout_cache

    def _forward_stacked_factored(self, x: torch.Tensor) -> torch.Tensor:
        # Dropout acts on the adapter input only, so the factors must run on their own.
        base = self.base_layer(x)  # [K, B, out]
        outputs = []
        # unbind, not x[k]: its backward stacks K slices instead of adding K zero-padded copies.
        for k, (x_k, base_k, a) in enumerate(
            zip(x.unbind(0), base.unbind(0), self.adapters, strict=True)
        ):
            hidden = F.linear(self._dropped(x_k, k), a.lora_A.weight)  # [B, r_k]
            outputs.append(torch.addmm(base_k, hidden, a.lora_B.weight.t(), alpha=a.scaling))
        return torch.stack(outputs)

    def extra_repr(self) -> str:
        return f"ranks={self.ranks}"


def cross_entropy_per_adapter(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """`F.cross_entropy(logits[k], target)` for every k, in one pass: `[K, B, C]` → `[K]`.

    A classifier's loss for K adapters at once, as `logsumexp - target logit`: torch's
    log_softmax over a 10-wide last dimension ran 2.5x slower on CPU than this, K times over.
    """
    picked = logits.gather(-1, target.expand(logits.shape[0], -1).unsqueeze(-1)).squeeze(-1)
    return (torch.logsumexp(logits, dim=-1) - picked).mean(dim=1)


def _frozen_tensors(network: nn.Module) -> dict[str, torch.Tensor]:
    adapter_ids = {
        id(p) for layer in lora_layers(network).values() for p in layer.adapter_parameters()
    }
    tensors = {n: p for n, p in network.named_parameters() if id(p) not in adapter_ids}
    tensors.update(dict(network.named_buffers()))
    return tensors


# Why a method's adapters cannot share one forward pass; the message names the method.
_UNFUSABLE = {
    "dora": "DoRA adapters do not fuse (each rescales its own merged weight by a magnitude); "
    "they run one after another",
    "pissa": "PiSSA adapters do not fuse (each replaces the frozen weight by its own residual "
    "W - s·B₀A₀); they run one after another",
}


def _check_plain_linear(name: str, layer: LoRALayer) -> None:
    if layer.method in _UNFUSABLE:
        raise GroupingError(f"{name}: {_UNFUSABLE[layer.method]}")
    if type(layer) is not LoRALinear:
        raise GroupingError(
            f"{name} is a {type(layer).__name__}; fused training handles Linear adapters only"
        )


def check_groupable(networks: Sequence[nn.Module]) -> None:
    """Raise `GroupingError` unless the networks differ only in their LoRALinear adapters.

    Checks: the same wrapped layer names; every wrapper a plain `LoRALinear` (DoRA and PiSSA
    layers are refused, the message naming the method); nothing trainable but the adapter
    factors (no trainable biases, no `modules_to_save`); identical frozen weights.
    """
    if not networks:
        raise GroupingError("no networks to group")
    first = lora_layers(networks[0])
    if not first:
        raise GroupingError("the network has no LoRA layers")
    reference = _frozen_tensors(networks[0])
    for network in networks:
        layers = lora_layers(network)
        if list(layers) != list(first):
            raise GroupingError("the networks wrap different layers")
        for name, layer in layers.items():
            _check_plain_linear(name, layer)
        factors = {id(p) for layer in layers.values() for p in layer.adapter_parameters()}
        extra = [
            n for n, p in network.named_parameters() if p.requires_grad and id(p) not in factors
        ]
        if extra:
            raise GroupingError(
                f"{extra[0]} trains besides the LoRA factors (bias / modules_to_save); "
                "fused training supports bias='none' without modules_to_save"
            )
        frozen = _frozen_tensors(network)
        if frozen.keys() != reference.keys() or not all(
            torch.equal(frozen[k], reference[k]) for k in reference
        ):
            raise GroupingError("the networks do not share the same frozen weights")


def group_networks(networks: Sequence[nn.Module]) -> nn.Module:
    """One network computing the outputs of all K networks: `[B, ...]` in, `[K, B, ...]` out.

    A deep copy of the first network's frozen structure in which every `LoRALinear` is replaced
    by a `GroupedLoRALinear` over the K networks' adapters at that name. Call `.train()` /
    `.eval()` on the result; the K networks' own modes are not used.

    Args:
        networks: K networks from `inject_lora` on the same pretrained weights.

    Raises:
        GroupingError: See `check_groupable`.
    """
    check_groupable(networks)
    # The copy shares the first network's frozen tensors (and so their device) instead of
    # holding its own.
    memo = {id(tensor): tensor for tensor in _frozen_tensors(networks[0]).values()}
    template = copy.deepcopy(networks[0], memo)
    for name, layer in lora_layers(template).items():
        adapters = [cast(LoRALinear, network.get_submodule(name)) for network in networks]
        base_layer = cast(nn.Linear, layer.base_layer)
        set_submodule(template, name, GroupedLoRALinear(adapters, base_layer=base_layer))
    for param in template.parameters():
        param.requires_grad_(False)  # the copy's own A/B are gone; nothing here trains
    return template


def share_frozen(networks: Sequence[nn.Module]) -> None:
    """Make the networks hold the first one's frozen parameters and buffers, in place.

    After it the K networks keep one copy of the frozen weights between them (each still
    owns its adapters), so a group of K runs costs one frozen network in memory.

    Raises:
        GroupingError: See `check_groupable` (nothing is changed then).
    """
    check_groupable(networks)
    first = networks[0]
    adapters = {
        id(p)
        for network in networks
        for layer in lora_layers(network).values()
        for p in layer.adapter_parameters()
    }
    for network in networks[1:]:
        for name, module in network.named_modules():
            source = first.get_submodule(name)
            for key, param in module._parameters.items():
                if param is not None and id(param) not in adapters:
                    module._parameters[key] = source._parameters[key]
            for key, buffer in module._buffers.items():
                if buffer is not None:
                    module._buffers[key] = source._buffers[key]


def check_grouped(
    grouped: nn.Module, networks: Sequence[nn.Module], probe: torch.Tensor, tolerance: float = 1e-4
) -> None:
    """Verify that `grouped(probe)[k]` equals `networks[k](probe)` for every k (eval mode).

    The B factors start at zero, which would make every adapter look right; they are set to
    random values for the check (from a private generator, so the global RNG is untouched) and
    restored after.

    Raises:
        GroupingError: If the forward fails on stacked activations or the outputs differ.
    """
    generator = torch.Generator().manual_seed(0)
    layers = [
        lay
        for net in networks
        for lay in lora_layers(net).values()
        if isinstance(lay, LoRALinear)  # all of them, after check_groupable
    ]
    saved = [layer.lora_B.weight.detach().clone() for layer in layers]
    modes = [net.training for net in networks] + [grouped.training]
    try:
        with torch.no_grad():
            for layer in layers:
                weight = layer.lora_B.weight
                # Unit-size updates whatever the scaling, so outputs stay comparable.
                weight.copy_(torch.randn(weight.shape, generator=generator) * 0.1 / layer.scaling)
            grouped.eval()
            for net in networks:
                net.eval()
            try:
                together = grouped(probe)
            except (RuntimeError, ValueError) as error:
                raise GroupingError(
                    f"the network's forward does not run on stacked activations ({error})"
                ) from None
            alone = torch.stack([net(probe) for net in networks])
            if together.shape != alone.shape or not torch.allclose(
                together, alone, rtol=tolerance, atol=tolerance
            ):
                raise GroupingError(
                    "the network's forward mixes the adapters' activations (outputs differ from "
                    "running each adapter alone)"
                )
    finally:
        with torch.no_grad():
            for layer, weight in zip(layers, saved, strict=True):
                layer.lora_B.weight.copy_(weight)
        for net, mode in zip(networks, modes, strict=False):
            net.train(mode)
        grouped.train(modes[-1])
