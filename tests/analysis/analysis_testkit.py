"""Builders for synthetic study folders whose analysis has known answers.

The main study: ΔW_full(hidden.0) = 5·p1 q1ᵀ + 1·p2 q2ᵀ (orthonormal p's, q's), and
  rank_2_seed_0  (α=4, scaling 2):            B·A·s = ΔW_full exactly, A's rows span q1, q2;
  rank_4_seed_0  (α=8, scaling 2):            B·A·s = 5·p1 q1ᵀ, A's rows q1..q4 in order;
  rank_4_seed_1  (α=8, rsLoRA, scaling 4):    B·A·s = p3 q5ᵀ, A's rows q5..q8 (orthogonal).
conv1's ΔW_full equals rank_2_seed_0's conv update; hidden.2 and head are not adapted.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from lora_lab.analysis import lora_delta

IN_DIM, OUT_DIM = 12, 16
ALPHA_R2, ALPHA_R4 = 4.0, 8.0


def orthonormal_rows(n: int, seed: int) -> torch.Tensor:
    """`[n, n]`: a random orthonormal basis of R^n, one vector per row."""
    generator = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    return q.T


def write_checkpoint(path: Path, state: dict[str, torch.Tensor]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({key: value.float().contiguous() for key, value in state.items()}, path)


def write_adapter(
    directory: Path,
    rank: int,
    alpha: float,
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]],
    use_rslora: bool = False,
) -> None:
    """A PEFT-format LoRA adapter: module -> (A, B)."""
    directory.mkdir(parents=True, exist_ok=True)
    config = {
        "peft_type": "LORA", "r": rank, "lora_alpha": alpha, "use_rslora": use_rslora,
        "target_modules": sorted(factors), "lora_dropout": 0.0, "bias": "none",
    }  # fmt: skip
    (directory / "adapter_config.json").write_text(json.dumps(config))
    tensors = {}
    for module, (a, b) in factors.items():
        tensors[f"base_model.model.{module}.lora_A.weight"] = a.float().contiguous()
        tensors[f"base_model.model.{module}.lora_B.weight"] = b.float().contiguous()
    save_file(tensors, directory / "adapter_model.safetensors")


def build_main_study(root: Path, *, checkpoints: bool = True, adapters: bool = True) -> Path:
    q, p = orthonormal_rows(IN_DIM, 1), orthonormal_rows(OUT_DIM, 2)
    generator = torch.Generator().manual_seed(3)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    conv_a, conv_b = randn(2, 3, 3, 3), randn(6, 2, 1, 1)
    deltas = {
        "hidden.0.weight": 5 * p[0:1].T @ q[0:1] + p[1:2].T @ q[1:2],
        "conv1.weight": lora_delta(conv_a, conv_b, ALPHA_R2 / 2),
        "hidden.2.weight": randn(8, OUT_DIM),
        "head.weight": randn(4, 8),
    }
    pretrain = {key: randn(*delta.shape) for key, delta in deltas.items()}
    pretrain |= {"hidden.0.bias": randn(OUT_DIM), "bn.weight": randn(6)}
    full = {key: value + deltas.get(key, 0.1) for key, value in pretrain.items()}
    if checkpoints:
        write_checkpoint(root / "checkpoints" / "pretrain.safetensors", pretrain)
        write_checkpoint(root / "checkpoints" / "full_finetune.safetensors", full)

    if adapters:
        descending = torch.diag(torch.tensor([4.0, 3.0, 2.0, 1.0], dtype=torch.float64))
        first_column = torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=torch.float64)
        write_adapter(root / "adapters" / "rank_2_seed_0", 2, ALPHA_R2, {
            "hidden.0": (torch.diag(torch.tensor([3.0, 1.0])).double() @ q[:2],
                         torch.stack([5 * p[0] / 6, p[1] / 2], dim=1)),
            "conv1": (conv_a, conv_b),
        })  # fmt: skip
        write_adapter(root / "adapters" / "rank_4_seed_0", 4, ALPHA_R4, {
            "hidden.0": (descending @ q[:4], torch.outer(5 * p[0] / 8, first_column)),
            "conv1": (randn(4, 3, 3, 3), randn(6, 4, 1, 1)),
        })  # fmt: skip
        write_adapter(root / "adapters" / "rank_4_seed_1", 4, ALPHA_R4, {
            "hidden.0": (descending @ q[4:8], torch.outer(p[2] / 16, first_column)),
            "conv1": (randn(4, 3, 3, 3), randn(6, 4, 1, 1)),
        }, use_rslora=True)  # fmt: skip
    (root / "results.csv").write_text(
        "stage,rank,alpha,seed,test_acc\n"
        "pretrain,,,0,0.5\nfull_finetune,,,0,0.9\n"
        "lora,2,4,0,0.81\nlora,4,8,0,0.85\nlora,4,8,1,0.84\n"
    )
    return root
