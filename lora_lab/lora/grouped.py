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

import torch
from torch import nn

from lora_lab.lora.grouped_layers import (
    GroupContext,
    GroupedLoRAConv2d,
    GroupedLoRALinear,
    GroupingError,
    PerMember,
    grouped_layer,
)
from lora_lab.lora.inject import adapter_state, lora_layers, set_submodule
from lora_lab.lora.pissa import PiSSALinear

__all__ = [
    "GroupedLoRAConv2d",
    "GroupedLoRALinear",
    "GroupingError",
    "PerMember",
    "check_groupable",
    "check_grouped",
    "cross_entropy_per_adapter",
    "group_networks",
    "member_modules",
    "share_frozen",
]


def cross_entropy_per_adapter(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """`F.cross_entropy(logits[k], target)` for every k, in one pass: `[K, B, C]` → `[K]`.

    A classifier's loss for K adapters at once, as `logsumexp - target logit`: torch's
    log_softmax over a 10-wide last dimension ran 2.5x slower on CPU than this, K times over.
    Under autocast it runs in float32, as autocast runs `F.cross_entropy`.
    """
    if torch.is_autocast_enabled(logits.device.type):
        logits = logits.float()
    picked = logits.gather(-1, target.expand(logits.shape[0], -1).unsqueeze(-1)).squeeze(-1)
    return (torch.logsumexp(logits, dim=-1) - picked).mean(dim=1)


Slot = tuple[nn.Module, str, bool]  # (module, attribute, is a parameter)


def _shared_slots(network: nn.Module) -> dict[str, Slot]:
    """Every frozen tensor the members share, by a name common to all methods.

    A PiSSA layer's base holds the member's own residual `W − s·B₀A₀` and its fixed
    `pissa_initial_*` factors (left out: the member owns them); its `pretrained_weight`
    stands for the pretrained W under `<layer>.base_layer.weight`, where the other methods
    keep it.
    """
    pissa = {name for name, layer in lora_layers(network).items() if isinstance(layer, PiSSALinear)}
    slots: dict[str, Slot] = {}
    for name, module in network.named_modules():
        prefix = f"{name}." if name else ""
        residual = name.removesuffix(".base_layer") in pissa and name.endswith(".base_layer")
        for key, param in module._parameters.items():
            if param is not None and not param.requires_grad and not (residual and key == "weight"):
                slots[prefix + key] = (module, key, True)
        for key, buffer in module._buffers.items():
            if buffer is None:
                continue
            if name in pissa:
                if key == "pretrained_weight":
                    slots[f"{prefix}base_layer.weight"] = (module, key, False)
            else:
                slots[prefix + key] = (module, key, False)
    return slots


def _tensor(slot: Slot) -> torch.Tensor:
    module, key, is_param = slot
    return module._parameters[key] if is_param else module._buffers[key]  # type: ignore[return-value]


def member_modules(network: nn.Module) -> list[str]:
    """The modules besides the LoRA layers whose parameters train: each member has its own.

    That is the `modules_to_save` and every module holding a trained parameter of its own
    (a bias under `lora.bias=all`), outside the LoRA layers (which group their biases).
    """
    state = adapter_state(network)
    saved = list(state.modules_to_save) if state is not None else []
    covered = [*lora_layers(network), *saved]
    own = [
        name
        for name, module in network.named_modules()
        if not any(name == c or name.startswith(f"{c}.") for c in covered)
        and any(p.requires_grad for p in module.parameters(recurse=False))
    ]
    return saved + own


def _check_network(network: nn.Module, names: list[str], owned: list[str]) -> None:
    layers = lora_layers(network)
    if list(layers) != names:
        raise GroupingError("the networks wrap different layers")
    merged = [name for name, layer in layers.items() if layer.merged]
    if merged:
        raise GroupingError(f"{merged[0]} is merged; fused training needs unmerged adapters")
    if member_modules(network) != owned:
        raise GroupingError("the networks train different modules besides their adapters")
    if "" in owned:
        raise GroupingError(
            "the network's own parameters train; fused training needs them in layers"
        )
    norms = [
        n for n, m in network.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
    ]
    if norms:
        raise GroupingError(
            f"{norms[0]} is a batch norm, whose batch statistics would mix the members' batches"
        )


def check_groupable(networks: Sequence[nn.Module]) -> None:
    """Raise `GroupingError` unless the networks can train as one group.

    Checks: the same wrapped layer names (any method and layer type); the same modules
    training besides the adapters (`member_modules`); no merged adapter; no batch norm; and
    identical shared frozen weights (`_shared_slots`: a PiSSA layer counts with its
    pretrained W).
    """
    if not networks:
        raise GroupingError("no networks to group")
    names = list(lora_layers(networks[0]))
    if not names:
        raise GroupingError("the network has no LoRA layers")
    owned = member_modules(networks[0])
    reference = {n: _tensor(s) for n, s in _shared_slots(networks[0]).items()}
    for network in networks:
        _check_network(network, names, owned)
        frozen = {n: _tensor(s) for n, s in _shared_slots(network).items()}
        if frozen.keys() != reference.keys() or not all(
            frozen[k].shape == reference[k].shape and torch.equal(frozen[k], reference[k])
            for k in reference
        ):
            raise GroupingError("the networks do not share the same frozen weights")


def group_networks(networks: Sequence[nn.Module]) -> nn.Module:
    """One network computing the outputs of all K networks: `[B, ...]` in, `[K, B, ...]` out.

    A deep copy of the first network's frozen structure in which every LoRA layer becomes its
    grouped form over the K networks' layers at that name (`grouped_layer`), and every other
    member-specific module (`member_modules`) a `PerMember`. Call `.train()` / `.eval()` on
    the result; it sets the members' own layers to its mode where it runs them.

    Args:
        networks: K networks from `inject_lora` on the same pretrained weights.

    Raises:
        GroupingError: See `check_groupable`.
    """
    check_groupable(networks)
    first = networks[0]
    # The copy shares the first network's frozen tensors (and so their device) instead of
    # holding its own.
    frozen = [p for p in first.parameters() if not p.requires_grad] + list(first.buffers())
    template = copy.deepcopy(first, {id(tensor): tensor for tensor in frozen})
    context = GroupContext(len(networks))
    for name in lora_layers(template):
        layers = [network.get_submodule(name) for network in networks]
        set_submodule(template, name, grouped_layer(layers, context))
    for name in member_modules(first):
        modules = [network.get_submodule(name) for network in networks]
        set_submodule(template, name, PerMember(modules, context))
    for param in template.parameters():
        param.requires_grad_(False)  # only shared frozen tensors are left; nothing here trains
    template.register_forward_pre_hook(context.begin)
    template.register_forward_hook(context.unfold)
    return template


def share_frozen(networks: Sequence[nn.Module]) -> None:
    """Make the networks hold the first one's frozen parameters and buffers, in place.

    After it the K networks keep one copy of the frozen weights between them (each still
    owns its adapters, trained modules and, for PiSSA, its residual base), so a group of K
    runs costs one frozen network in memory.

    Raises:
        GroupingError: See `check_groupable` (nothing is changed then).
    """
    check_groupable(networks)
    source = {name: _tensor(slot) for name, slot in _shared_slots(networks[0]).items()}
    parameters: dict[str, nn.Parameter] = {}
    for network in networks[1:]:
        for name, (module, key, is_param) in _shared_slots(network).items():
            tensor = source[name]
            if not is_param:
                module._buffers[key] = tensor.detach()
                continue
            if name not in parameters:  # one Parameter object per name, shared by all
                parameters[name] = (
                    tensor
                    if isinstance(tensor, nn.Parameter)
                    else nn.Parameter(tensor, requires_grad=False)
                )
            module._parameters[key] = parameters[name]


def check_grouped(
    grouped: nn.Module, networks: Sequence[nn.Module], probe: torch.Tensor, tolerance: float = 1e-4
) -> None:
    """Verify that `grouped(probe)[k]` equals `networks[k](probe)` for every k (eval mode).

    The B factors start at zero, which would make every adapter look right: every trained
    tensor of the members is set to random values for the check (from a private generator,
    so the global RNG is untouched) and restored after.

    Raises:
        GroupingError: If the forward fails on folded activations or the outputs differ.
    """
    generator = torch.Generator().manual_seed(0)
    tensors = [p for net in networks for p in net.parameters() if p.requires_grad]
    saved = [tensor.detach().clone() for tensor in tensors]
    modes = [net.training for net in networks] + [grouped.training]
    try:
        with torch.no_grad():
            _randomise(networks, generator)
            grouped.eval()
            for net in networks:
                net.eval()
            try:
                together = grouped(probe)
            except (RuntimeError, ValueError) as error:
                raise GroupingError(
                    f"the network's forward does not run on folded activations ({error})"
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
            for tensor, value in zip(tensors, saved, strict=True):
                tensor.copy_(value)
        for net, mode in zip(networks, modes, strict=False):
            net.train(mode)
        grouped.train(modes[-1])


def _randomise(networks: Sequence[nn.Module], generator: torch.Generator) -> None:
    """Give every trained tensor of the networks a random value (in place, no grad)."""
    for network in networks:
        updates: set[int] = set()
        for layer in lora_layers(network).values():
            for key, tensor in layer.adapter_tensors().items():
                if key.startswith(("lora_B", "lora_embedding_A")):
                    # Unit-size updates whatever the scaling, so outputs stay comparable.
                    noise = torch.randn(tensor.shape, generator=generator) * 0.1 / layer.scaling
                    tensor.copy_(noise)
                    updates.add(id(tensor))
        for tensor in network.parameters():
            if tensor.requires_grad and id(tensor) not in updates:
                tensor.add_(torch.randn(tensor.shape, generator=generator) * 0.1)
