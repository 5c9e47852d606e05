"""Builders for synthetic study folders whose analysis has known answers.

A study is what the pipeline leaves: each run's `runs/<run_id>/result.json` (identity, test_acc,
`artefact`, and the model config under `config.model`), the weights files and adapter folders
the records name, and `results.csv`. The networks are `ToyNet` (or `Embedder`), built from the
record's `_target_` node like any model config.

The main study: ΔW_full(hidden.0) = 5·p1 q1ᵀ + 1·p2 q2ᵀ (orthonormal p's, q's), and
  rank_2_seed_0  (α=4, scaling 2):            B·A·s = ΔW_full exactly, A's rows span q1, q2;
  rank_4_seed_0  (α=8, scaling 2):            B·A·s = 5·p1 q1ᵀ, A's rows q1..q4 in order;
  rank_4_seed_1  (α=8, rsLoRA, scaling 4):    B·A·s = p3 q5ᵀ, A's rows q5..q8 (orthogonal).
conv1's ΔW_full equals rank_2_seed_0's conv update; hidden.2 and head are not adapted.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from lora_lab.results import RunResult, find_results, results_frame, write_result

IN_DIM, OUT_DIM = 12, 16
ALPHA_R2, ALPHA_R4 = 4.0, 8.0
TOY_NET: dict[str, Any] = {"_target_": "tests.analysis.testkit.ToyNet"}
EMBEDDER: dict[str, Any] = {"_target_": "tests.analysis.testkit.Embedder"}


class ToyNet(nn.Module):
    """The main study's network. The analysis only reads its layers, so it has no forward."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, bias=False)
        self.norm = nn.LayerNorm(6)  # 1-D weights: no spectrum
        self.hidden = nn.Sequential(
            nn.Linear(IN_DIM, OUT_DIM), nn.ReLU(), nn.Linear(OUT_DIM, 8, bias=False)
        )
        self.head = nn.Linear(8, 4, bias=False)


class Embedder(nn.Module):
    """One embedding table `emb`, weight `[10, 4]` (num_embeddings, dim)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 4)


def orthonormal_rows(n: int, seed: int) -> torch.Tensor:
    """`[n, n]`: a random orthonormal basis of R^n, one vector per row."""
    generator = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    return q.T


def conv_update(a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """B·A·scaling of a conv adapter, A `[r, in, kh, kw]`, B `[out, r, 1, 1]` -> `[out, in, kh, kw]`."""
    return (b.flatten(1) @ a.flatten(1)).reshape(b.shape[0], *a.shape[1:]) * scaling


def write_checkpoint(path: Path, state: dict[str, torch.Tensor]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({key: value.float().contiguous() for key, value in state.items()}, path)


def write_adapter(
    directory: Path,
    rank: int,
    alpha: float,
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]],
    use_rslora: bool = False,
    embedding: bool = False,
) -> None:
    """A PEFT-format LoRA adapter, written by hand (as PEFT would): module -> (A, B).

    With `embedding`, the factors are an `nn.Embedding`'s: bare `lora_embedding_A/B` keys.
    """
    directory.mkdir(parents=True, exist_ok=True)
    config = {
        "peft_type": "LORA", "r": rank, "lora_alpha": alpha, "use_rslora": use_rslora,
        "target_modules": sorted(factors), "lora_dropout": 0.0, "bias": "none",
    }  # fmt: skip
    (directory / "adapter_config.json").write_text(json.dumps(config))
    tensors = {}
    for module, (a, b) in factors.items():
        key = "lora_embedding_{}" if embedding else "lora_{}.weight"
        tensors[f"base_model.model.{module}.{key.format('A')}"] = a.float().contiguous()
        tensors[f"base_model.model.{module}.{key.format('B')}"] = b.float().contiguous()
    save_file(tensors, directory / "adapter_model.safetensors")


def write_run(
    root: Path,
    run_id: str,
    stage: str,
    *,
    artefact: str | None,
    model: dict[str, Any] | None = None,
    **fields: Any,
) -> None:
    """A run's `result.json` as the pipeline writes it: the row, its artefact, its config."""
    result = RunResult(run_id, stage, run_dir=f"runs/{run_id}", artefact=artefact, **fields)
    config = {"model": model or TOY_NET, "stage": stage}
    write_result(root / "runs" / run_id, result.to_record(config=config))


def write_weights_run(
    root: Path, run_id: str, stage: str, state: dict[str, torch.Tensor], **fields: Any
) -> None:
    """A pretrain or full-finetune run: `checkpoints/<run_id>.safetensors` and its record."""
    artefact = f"checkpoints/{run_id}.safetensors"
    write_checkpoint(root / artefact, state)
    write_run(root, run_id, stage, artefact=artefact, **fields)


def write_lora_run(
    root: Path,
    name: str,
    rank: int,
    alpha: float,
    seed: int,
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]],
    *,
    use_rslora: bool = False,
    embedding: bool = False,
    learning_rate: float = 1e-3,
    method: str = "default",
    **fields: Any,
) -> None:
    """A LoRA run: `adapters/<name>/` and its record (run_id `lora_<name>`); `fields` go to
    the record (`test_acc`, ...) or name its network (`model`)."""
    write_adapter(root / "adapters" / name, rank, alpha, factors, use_rslora, embedding)
    write_run(
        root, f"lora_{name}", "lora", artefact=f"adapters/{name}", rank=rank, alpha=alpha,
        seed=seed, learning_rate=learning_rate, method=method, **fields,
    )  # fmt: skip


def write_results_csv(root: Path) -> None:
    """`results.csv` from the records, as the pipeline derives it."""
    records, _ = find_results(root)
    (root / "results.csv").write_text(results_frame(records).to_csv(index=False))


def toy_weights(generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Random weights for every tensor of `ToyNet`'s state dict, float64."""
    shapes = {key: value.shape for key, value in ToyNet().state_dict().items()}
    return {key: torch.randn(*shape, generator=generator, dtype=torch.float64)
            for key, shape in shapes.items()}  # fmt: skip


def build_main_study(root: Path, *, checkpoints: bool = True, adapters: bool = True) -> Path:
    q, p = orthonormal_rows(IN_DIM, 1), orthonormal_rows(OUT_DIM, 2)
    generator = torch.Generator().manual_seed(3)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    conv_a, conv_b = randn(2, 3, 3, 3), randn(6, 2, 1, 1)
    deltas = {
        "hidden.0.weight": 5 * p[0:1].T @ q[0:1] + p[1:2].T @ q[1:2],
        "conv1.weight": conv_update(conv_a, conv_b, ALPHA_R2 / 2),
        "hidden.2.weight": randn(8, OUT_DIM),
        "head.weight": randn(4, 8),
    }
    pretrain = toy_weights(generator)
    full = {key: value + deltas.get(key, 0.1) for key, value in pretrain.items()}
    if checkpoints:
        write_weights_run(root, "pretrain", "pretrain", pretrain, seed=0, test_acc=0.5)
        write_weights_run(root, "full_finetune", "full_finetune", full, seed=0, test_acc=0.9)

    if adapters:
        descending = torch.diag(torch.tensor([4.0, 3.0, 2.0, 1.0], dtype=torch.float64))
        first_column = torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=torch.float64)
        write_lora_run(root, "rank_2_seed_0", 2, ALPHA_R2, 0, {
            "hidden.0": (torch.diag(torch.tensor([3.0, 1.0])).double() @ q[:2],
                         torch.stack([5 * p[0] / 6, p[1] / 2], dim=1)),
            "conv1": (conv_a, conv_b),
        }, test_acc=0.81)  # fmt: skip
        write_lora_run(root, "rank_4_seed_0", 4, ALPHA_R4, 0, {
            "hidden.0": (descending @ q[:4], torch.outer(5 * p[0] / 8, first_column)),
            "conv1": (randn(4, 3, 3, 3), randn(6, 4, 1, 1)),
        }, test_acc=0.85)  # fmt: skip
        write_lora_run(root, "rank_4_seed_1", 4, ALPHA_R4, 1, {
            "hidden.0": (descending @ q[4:8], torch.outer(p[2] / 16, first_column)),
            "conv1": (randn(4, 3, 3, 3), randn(6, 4, 1, 1)),
        }, use_rslora=True, test_acc=0.84)  # fmt: skip
    write_results_csv(root)
    return root
