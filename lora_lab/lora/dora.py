"""DoRA (Liu et al. 2024): weight-decomposed LoRA for `nn.Linear`, `nn.Conv2d`, `nn.Embedding`.

The adapted weight is `m · (W + s·B·A) / ‖W + s·B·A‖`: the direction comes from the LoRA-updated
weight and a trainable magnitude `m` sets each row's length. As in PEFT's
`peft/tuners/lora/dora.py` (whose forward is followed term by term):

- the norm is taken per output row for Linear (`[out]`), over all but the output channel for
  Conv2d (`[1, out, 1, 1]`, PEFT's shape) and per embedding dimension for Embedding (over all
  tokens, `[embedding_dim]`, PEFT's `fan_in_fan_out` layout);
- the norm is detached (DoRA paper §4.3): it reflects ΔW but passes no gradient;
- `m` starts at the norm of `W + s·B·A` at injection, which is ‖W‖ since B·A = 0, so a fresh
  adapter changes no output;
- Linear/Conv2d add `(m/‖·‖ − 1) · (base output without bias) + m/‖·‖ · s · B(A(x))` to the base
  output; with dropout in training that "base output" is recomputed from the dropped input
  (PEFT does the same), while the base layer itself sees the clean input.

`m` is the Parameter `lora_magnitude_vector` of the wrapper, so adapter files hold
`base_model.model.<module>.lora_magnitude_vector`, PEFT's saved key.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lora_lab.lora.embedding import LoRAEmbedding
from lora_lab.lora.layers import LoRAConv2d, LoRALayer, LoRALinear


class DoRAMixin(LoRALayer):
    """The magnitude vector, merge and ΔW shared by the DoRA wrappers.

    Subclasses define `weight_norm` (the norm, shaped like the magnitude) and `factor_shape`
    (how a magnitude-shaped tensor broadcasts against the weight).
    """

    method = "dora"
    lora_magnitude_vector: nn.Parameter
    factor_shape: tuple[int, ...]

    def weight_norm(self, weight: torch.Tensor) -> torch.Tensor:
        """‖weight‖ per magnitude entry, shaped like `lora_magnitude_vector`."""
        raise NotImplementedError

    def reset_adapter(self, init: str) -> None:
        """Initialise A and B as LoRA does, then set m = ‖W + ΔW‖ (= ‖W‖ as ΔW = 0)."""
        super().reset_adapter(init)
        weight = self.base_layer.weight
        with torch.no_grad():
            norm = self.weight_norm(weight + self.delta_weight().to(weight.dtype)).to(weight.dtype)
        if "lora_magnitude_vector" in self._parameters:
            with torch.no_grad():
                self.lora_magnitude_vector.copy_(norm)
        else:
            self.lora_magnitude_vector = nn.Parameter(norm)

    def adapter_tensors(self) -> dict[str, nn.Parameter]:
        tensors = super().adapter_tensors()
        tensors["lora_magnitude_vector"] = self.lora_magnitude_vector
        return tensors

    def merged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """m / ‖W + ΔW‖ · (W + ΔW) in fp32, as PEFT's DoRA merge computes it.

        Args:
            weight: The unmerged base weight W in fp32.
        """
        updated = weight + self.delta_weight()
        factor = self.lora_magnitude_vector.float() / self.weight_norm(updated).detach()
        return factor.reshape(self.factor_shape) * updated

    def effective_delta_weight(self) -> torch.Tensor:
        """m / ‖W + ΔW‖ · (W + ΔW) − W in fp32: what DoRA adds to the pretrained weight."""
        weight = self.unmerged_weight().float()
        return self.merged_weight(weight) - weight

    def _scale(self, lora_weight: torch.Tensor) -> torch.Tensor:
        """m / ‖W + s·lora_weight‖ with the norm detached (DoRA §4.3), magnitude-shaped."""
        weight = self.base_layer.weight
        norm = self.weight_norm(weight + self.scaling * lora_weight.detach()).to(weight.dtype)
        return self.lora_magnitude_vector / norm.detach()


class DoRALinear(DoRAMixin, LoRALinear):
    """DoRA around an `nn.Linear` (weight [out, in]); magnitude [out], one per output row.

    Args:
        base_layer: The layer to adapt. Frozen, not copied.
        rank: r; A weight [r, in], B weight [out, r].
        alpha: Scale numerator.
        dropout: Dropout on the adapter input.
        use_rslora: Scale by alpha/sqrt(r) instead of alpha/r.
        init: "kaiming" or "gaussian" init of A; B starts at zero.
    """

    factor_shape = (-1, 1)

    def weight_norm(self, weight: torch.Tensor) -> torch.Tensor:
        """Row norms of weight [out, in] -> [out]."""
        return torch.linalg.norm(weight, dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x [..., in]. Returns: [..., out]."""
        result = self.base_layer(x)
        if self.merged:
            return result
        weight = self.base_layer.weight
        scale = self._scale(self.lora_B.weight @ self.lora_A.weight).view(1, -1)  # [1, out]
        if self._has_dropout and self.training:
            x = self.lora_dropout(x)
            base_result = F.linear(x, weight)
        else:
            bias = self.base_layer.bias
            base_result = result if bias is None else result - bias
        lora_result = self.lora_B(self.lora_A(x))
        return result + (scale - 1) * base_result + scale * lora_result * self.scaling


class DoRAConv2d(DoRAMixin, LoRAConv2d):
    """DoRA around an `nn.Conv2d` (weight [out, in, kh, kw]); magnitude [1, out, 1, 1].

    Args:
        base_layer: The conv to adapt. Grouped convs (groups > 1) are refused.
        rank: r; A weight [r, in, kh, kw], B weight [out, r, 1, 1].
        alpha: Scale numerator.
        dropout: Dropout on the adapter input.
        use_rslora: Scale by alpha/sqrt(r) instead of alpha/r.
        init: "kaiming" or "gaussian" init of A; B starts at zero.
    """

    factor_shape = (-1, 1, 1, 1)

    def weight_norm(self, weight: torch.Tensor) -> torch.Tensor:
        """Norm over (in, kh, kw) of weight [out, in, kh, kw] -> [1, out, 1, 1]."""
        return weight.norm(p=2, dim=(1, 2, 3), keepdim=True).transpose(1, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x [N, in, H, W]. Returns: [N, out, H', W']."""
        result = self.base_layer(x)
        if self.merged:
            return result
        base = self.base_layer
        rank = self.rank
        lora_weight = (self.lora_B.weight.view(-1, rank) @ self.lora_A.weight.view(rank, -1)).view(
            base.weight.shape
        )
        scale = self._scale(lora_weight)  # [1, out, 1, 1]
        if self._has_dropout and self.training:
            x = self.lora_dropout(x)
            # _conv_forward honours padding_mode, as the base layer does.
            base_result = base._conv_forward(x, base.weight, None)
        else:
            base_result = result if base.bias is None else result - base.bias.view(1, -1, 1, 1)
        lora_result = self.lora_B(self.lora_A(x))
        return result + (scale - 1) * base_result + scale * lora_result * self.scaling


class DoRAEmbedding(DoRAMixin, LoRAEmbedding):
    """DoRA around an `nn.Embedding` (weight [num_embeddings, dim]); magnitude [dim].

    As PEFT's `DoraEmbeddingLayer`: the norm runs over all tokens for each embedding dimension,
    and the output is `m/‖·‖ · (base(x) + s · embed(x, Aᵀ) @ Bᵀ)`. No dropout (indices in).

    Args:
        base_layer: The embedding to adapt. Frozen, not copied.
        rank: r; A [r, num_embeddings] (zeros), B [dim, r] (normal).
        alpha: Scale numerator.
        use_rslora: Scale by alpha/sqrt(r) instead of alpha/r.
    """

    factor_shape = (1, -1)

    def weight_norm(self, weight: torch.Tensor) -> torch.Tensor:
        """Column norms of weight [num_embeddings, dim] -> [dim]."""
        return torch.linalg.norm(weight.t(), dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x [...] integer indices. Returns: [..., embedding_dim]."""
        result = self.base_layer(x)
        if self.merged:
            return result
        # (B·A)ᵀ [num_embeddings, dim], the update in the weight's layout.
        lora_weight = (self.lora_embedding_B @ self.lora_embedding_A).t()
        scale = self._scale(lora_weight)  # [dim]
        return scale * result + scale * self.embed_update(x) * self.scaling
