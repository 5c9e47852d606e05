"""The straightforward reference study that `bench/study.py` measures lora_lab against.

Written the usual way, as in the classic LoRA-from-scratch notebook: torchvision's
FashionMNIST with `ToTensor` + `Normalize` in a `DataLoader`, a fresh Lightning `Trainer` per
stage, the 784-64-64-10 MLP, a hand-written LoRA linear layer with scaling α = 1.
Usage: python bench/_reference_study.py ROOT OUT_JSON EPOCHS RANKS(comma-separated)
"""

from __future__ import annotations

import copy
import json
import sys
import time
import warnings

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, random_split
from torchmetrics.classification import MulticlassAccuracy
from torchvision import datasets, transforms

warnings.filterwarnings("ignore")


class LoRALayer(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, rank: int, alpha: float) -> None:
        super().__init__()
        std = 1 / torch.sqrt(torch.tensor(rank).float())
        self.A = nn.Parameter(torch.randn(in_dim, rank) * std)
        self.B = nn.Parameter(torch.zeros(rank, out_dim))
        self.alpha = alpha

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.alpha * (x @ self.A @ self.B)


class LinearWithLoRA(nn.Module):
    def __init__(self, linear: nn.Linear, rank: int, alpha: float) -> None:
        super().__init__()
        self.linear = linear
        self.lora = LoRALayer(linear.in_features, linear.out_features, rank, alpha)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) + self.lora(x)


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(784, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(torch.flatten(x, 1))


class LitModel(L.LightningModule):
    def __init__(self, model: nn.Module, lr: float = 2e-4) -> None:
        super().__init__()
        self.model, self.lr = model, lr
        self.val_acc = MulticlassAccuracy(10, average="micro")
        self.test_acc = MulticlassAccuracy(10, average="micro")

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.model(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self.model(x)
        self.log("val_loss", F.cross_entropy(logits, y))
        self.val_acc(logits, y)
        self.log("val_acc", self.val_acc, prog_bar=True)

    def test_step(self, batch, batch_idx):
        x, y = batch
        logits = self.model(x)
        self.test_acc(logits, y)
        self.log("test_acc", self.test_acc)

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        return torch.optim.Adam(params, lr=self.lr)


def fit_and_test(model: nn.Module, loaders: tuple, epochs: int) -> float:
    lit = LitModel(model)
    trainer = L.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
    )
    trainer.fit(lit, loaders[0], loaders[1])
    return trainer.test(lit, loaders[2], verbose=False)[0]["test_acc"]


def main() -> None:
    root, out, epochs = sys.argv[1], sys.argv[2], int(sys.argv[3])
    ranks = [int(r) for r in sys.argv[4].split(",")]
    L.seed_everything(0, verbose=False)
    tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.2860,), (0.3530,))])
    train_full = datasets.FashionMNIST(root, train=True, download=False, transform=tf)
    test = datasets.FashionMNIST(root, train=False, download=False, transform=tf)
    train, val = random_split(train_full, [55000, 5000], generator=torch.Generator().manual_seed(0))
    loaders = (
        DataLoader(train, batch_size=1024, shuffle=True),
        DataLoader(val, batch_size=1024),
        DataLoader(test, batch_size=1024),
    )
    rows = []
    start = time.perf_counter()
    model = MLP()
    rows.append(
        {"stage": "pretrain", "rank": None, "test_acc": fit_and_test(model, loaders, epochs)}
    )
    pretrained = copy.deepcopy(model.state_dict())
    full = MLP()
    full.load_state_dict(pretrained)
    rows.append(
        {"stage": "full_finetune", "rank": None, "test_acc": fit_and_test(full, loaders, epochs)}
    )
    for rank in ranks:
        lora = MLP()
        lora.load_state_dict(pretrained)
        for p in lora.parameters():
            p.requires_grad = False
        for i in (0, 2, 4):
            lora.layers[i] = LinearWithLoRA(lora.layers[i], rank, alpha=1.0)
        rows.append(
            {"stage": "lora", "rank": rank, "test_acc": fit_and_test(lora, loaders, epochs)}
        )
    with open(out, "w") as handle:
        json.dump({"rows": rows, "seconds": time.perf_counter() - start}, handle)


if __name__ == "__main__":
    main()
