"""PiSSA (Meng et al. 2024): LoRA initialised from the principal singular components of W.

At injection W [out, in] = V·diag(S)·Uᴴ (fp32 SVD) gives, exactly as PEFT's
`LoraLayer.pissa_init` (note `S_r /= scaling`):

    A₀ = diag(√(S_r / s)) · Uᴴ_r   [r, in]        B₀ = V_r · diag(√(S_r / s))   [out, r]

and the frozen base weight becomes the residual `W_res = W − s·B₀·A₀`, so the adapted layer
computes W at first (to fp32 rounding). Training moves A and B only.

For saving, a PiSSA adapter is converted as PEFT's
`save_pretrained(path_initial_model_for_weight_conversion=...)` does: `W_res + s·B·A =
W + s·(B·A − B₀·A₀)`, a plain LoRA of rank 2r on the *unmodified* W with
`A' = [A; A₀]` [2r, in], `B' = [B, −B₀]` [out, 2r], r' = 2r and alpha' = 2·alpha (√2·alpha
with rsLoRA), so that the scaling is unchanged. PEFT, like this module, supports PiSSA on
`nn.Linear` only (its Conv2d raises, its Embedding ignores the init).
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from lora_lab.lora.config import LoRAConfig
from lora_lab.lora.layers import LoRALinear


def pissa_factors(
    weight: torch.Tensor, rank: int, scaling: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PEFT's PiSSA init: the factors and the residual weight, all in fp32.

    Args:
        weight: W [out, in], any float dtype.
        rank: r, at most min(out, in).
        scaling: The adapter's scaling s.

    Returns:
        (A₀ [r, in], B₀ [out, r], W − s·B₀·A₀ [out, in]).
    """
    full = weight.detach().to(torch.float32)
    v, s, uh = torch.linalg.svd(full, full_matrices=False)
    v_r = v[:, :rank]
    s_r = s[:rank] / scaling
    uh_r = uh[:rank]
    a = torch.diag(torch.sqrt(s_r)) @ uh_r
    b = v_r @ torch.diag(torch.sqrt(s_r))
    return a, b, full - scaling * b @ a


def check_pissa_target(name: str, module: nn.Module, rank: int) -> None:
    """Raise ValueError unless PiSSA of this rank can be applied to `module`.

    Args:
        name: The module's name, for the message.
        module: The layer to adapt.
        rank: The adapter's rank.
    """
    if not isinstance(module, nn.Linear):
        raise ValueError(
            f"module {name!r} is a {type(module).__name__}; init='pissa' supports nn.Linear only "
            "(as PEFT); exclude it from target_modules"
        )
    limit = min(module.in_features, module.out_features)
    if rank > limit:
        raise ValueError(
            f"module {name!r}: init='pissa' needs rank <= min(in, out) = {limit} "
            f"(weight [{module.out_features}, {module.in_features}]), got rank={rank}"
        )


def converted_config(config: LoRAConfig) -> LoRAConfig:
    """The plain-LoRA config of a converted PiSSA adapter: rank 2r, same scaling.

    As PEFT's `save_pretrained` with `path_initial_model_for_weight_conversion`: r' = 2r,
    alpha' = 2·alpha (alpha/r kept), or √2·alpha with rsLoRA (alpha/√r kept), init True.
    """
    factor = math.sqrt(2) if config.use_rslora else 2
    return dataclasses.replace(
        config, rank=2 * config.rank, alpha=config.alpha * factor, init="kaiming"
    )


class PiSSALinear(LoRALinear):
    """LoRA around an `nn.Linear` with PiSSA init; the base weight is replaced by the residual.

    Non-persistent buffers (state dicts keep PEFT's layout; they follow `.to(device)`):
    `pissa_initial_A` [r, in] and `pissa_initial_B` [out, r] are A₀, B₀; `pretrained_weight`
    [out, in] is the exact original W (one extra copy of W), put back by `restore_base`.

    Args:
        base_layer: The layer to adapt, weight [out, in]. Its weight is set to the residual.
        rank: r <= min(in, out).
        alpha: Scale numerator.
        dropout: Dropout on the adapter input only.
        use_rslora: Scale by alpha/sqrt(r) instead of alpha/r.

    Raises:
        ValueError: If rank > min(in, out).
    """

    method = "pissa"
    pissa_initial_A: torch.Tensor
    pissa_initial_B: torch.Tensor
    pretrained_weight: torch.Tensor

    def __init__(
        self,
        base_layer: nn.Linear,
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        use_rslora: bool = False,
    ) -> None:
        check_pissa_target("base_layer", base_layer, rank)
        super().__init__(base_layer, rank, alpha, dropout, use_rslora, init="pissa")

    def reset_adapter(self, init: str) -> None:
        """Set A, B to the PiSSA factors of the pretrained W and the base weight to W_res.

        The residual goes into a new Parameter: the original weight Parameter is left as it
        was, so a network sharing it (or a tied layer) keeps the pretrained values (PEFT
        overwrites `weight.data` in place instead).
        """
        del init  # always PiSSA
        weight = self.base_layer.weight
        pretrained = self._buffers.get("pretrained_weight")
        if pretrained is None:
            pretrained = weight.detach()  # the original storage, not a copy
        a, b, residual = pissa_factors(pretrained, self.rank, self.scaling)
        with torch.no_grad():
            self.lora_A.weight.copy_(a)
            self.lora_B.weight.copy_(b)
        self.register_buffer("pissa_initial_A", a.to(weight.dtype), persistent=False)
        self.register_buffer("pissa_initial_B", b.to(weight.dtype), persistent=False)
        self.register_buffer("pretrained_weight", pretrained, persistent=False)
        self.base_layer.weight = nn.Parameter(residual.to(weight.dtype), requires_grad=False)

    def configure(self, alpha: float, dropout: float, use_rslora: bool) -> None:
        """Refused: the residual depends on the scaling, so PiSSA layers are rebuilt instead."""
        raise ValueError("a PiSSA layer cannot change its scaling in place; re-inject instead")

    def restore_base(self) -> None:
        """Put the exact pretrained W back into `base_layer` (the wrapper is then stale)."""
        if self.merged:
            raise ValueError("unmerge the PiSSA layer before restoring its base weight")
        self.base_layer.weight = nn.Parameter(self.pretrained_weight, requires_grad=False)

    def initial_delta_weight(self) -> torch.Tensor:
        """s·B₀·A₀ [out, in] in fp32: the part of W moved into the adapter at injection."""
        return (self.pissa_initial_B.float() @ self.pissa_initial_A.float()) * self.scaling

    def effective_delta_weight(self) -> torch.Tensor:
        """s·(B·A − B₀·A₀) [out, in] in fp32: what training has added to the pretrained W."""
        return self.delta_weight() - self.initial_delta_weight()

    def converted_factors(self) -> dict[str, torch.Tensor]:
        """The rank-2r plain-LoRA factors on the pretrained W, keyed as in adapter files.

        Returns:
            {"lora_A.weight": [A; A₀] [2r, in], "lora_B.weight": [B, −B₀] [out, 2r]}.
        """
        a = torch.cat([self.lora_A.weight.detach(), self.pissa_initial_A], dim=0)
        b = torch.cat([self.lora_B.weight.detach(), -self.pissa_initial_B], dim=1)
        return {"lora_A.weight": a, "lora_B.weight": b}
