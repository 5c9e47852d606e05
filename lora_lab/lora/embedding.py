"""LoRA wrapper for `nn.Embedding`, laid out exactly as HF PEFT's `lora.Embedding`.

PEFT stores the factors as bare Parameters `lora_embedding_A` [r, num_embeddings] and
`lora_embedding_B` [embedding_dim, r] (not as sub-modules), so file keys have no `.weight`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lora_lab.lora.layers import LoRALayer


class LoRAEmbedding(LoRALayer):
    """LoRA around an `nn.Embedding`: y = base(x) + embed(x, Aᵀ) @ Bᵀ · scaling.

    Matches PEFT: A [r, num_embeddings] starts at zero and B [embedding_dim, r] is standard
    normal, so ΔW = (B·A)ᵀ [num_embeddings, embedding_dim] starts at zero. The lookup into Aᵀ uses
    the base layer's padding_idx / max_norm / sparse options, as PEFT does. No dropout (the input
    is indices).

    Args:
        base_layer: The embedding to adapt. Frozen, not copied.
        rank: r.
        alpha: Scale numerator.
        use_rslora: Scale by alpha/sqrt(r) instead of alpha/r.
    """

    def __init__(
        self, base_layer: nn.Embedding, rank: int, alpha: float, use_rslora: bool = False
    ) -> None:
        super().__init__(base_layer, rank, alpha, use_rslora)
        weight = base_layer.weight
        factory = {"device": weight.device, "dtype": weight.dtype}
        self.lora_embedding_A = nn.Parameter(
            torch.empty(rank, base_layer.num_embeddings, **factory)
        )
        self.lora_embedding_B = nn.Parameter(torch.empty(base_layer.embedding_dim, rank, **factory))
        self.reset_adapter("kaiming")

    def _set_dropout(self, dropout: float) -> None:
        del dropout  # the input is indices; PEFT applies no dropout to embeddings either

    def adapter_tensors(self) -> dict[str, nn.Parameter]:
        return {
            "lora_embedding_A": self.lora_embedding_A,
            "lora_embedding_B": self.lora_embedding_B,
        }

    def reset_adapter(self, init: str) -> None:
        # PEFT uses zeros/normal for embeddings whatever init_lora_weights says.
        del init
        nn.init.zeros_(self.lora_embedding_A)
        nn.init.normal_(self.lora_embedding_B)

    def delta_weight(self) -> torch.Tensor:
        """ΔW [num_embeddings, dim] = (B [dim, r] @ A [r, num_embeddings])ᵀ · scaling, fp32."""
        product = self.lora_embedding_B.float() @ self.lora_embedding_A.float()
        return product.t() * self.scaling

    def embed_update(self, x: torch.Tensor) -> torch.Tensor:
        """embed(x, Aᵀ) @ Bᵀ without scaling: x [...] -> [..., dim]."""
        base = self.base_layer
        after_a = F.embedding(
            x,
            self.lora_embedding_A.t(),
            padding_idx=base.padding_idx,
            max_norm=base.max_norm,
            norm_type=base.norm_type,
            scale_grad_by_freq=base.scale_grad_by_freq,
            sparse=base.sparse,
        )  # [..., r]
        return after_a @ self.lora_embedding_B.t()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x [...] integer indices. Returns: [..., embedding_dim]."""
        result = self.base_layer(x)
        if self.merged:
            return result
        return result + self.embed_update(x) * self.scaling
