"""The synthetic linear-shift task: regression targets whose finetuning update has rank one.

Pretraining data is ``y = X θ``; finetuning data (``shift=s``) is ``y = X (θ + s)``, so the
ideal weight update of a linear model is ``s · ones`` — rank one. A LoRA adapter of rank 1
can represent it exactly, which makes the task a clean check of rank sweeps.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lora_lab.data.base import BatchedDataModule
from lora_lab.data.errors import DataError
from lora_lab.data.loader import BatchTensorDataset, derive_seed

# Seed streams under data_seed: θ does not depend on n, so stages with other n share it.
_THETA_STREAM = 0
_INPUTS_STREAM = 1


class LinearShiftDataModule(BatchedDataModule):
    """Gaussian inputs and linear targets ``y = X (θ + shift)``, split train/val/test.

    Args:
        n: Number of samples before splitting.
        d_in: Input dimension.
        d_out: Output dimension.
        shift: Added to every entry of θ to make the targets; 0 for pretraining, e.g. 1 for
            finetuning stages.
        data_seed: Seed of θ and X; separate from ``seed`` so every training seed and every
            stage sees the same θ and X.
        val_fraction: Share of samples for validation.
        test_fraction: Share of samples for testing.
        batch_size: Training batch size.
        eval_batch_size: Validation/test batch size; defaults to ``batch_size``.
        seed: Seed of the per-epoch training shuffle.
        num_workers: DataLoader worker processes.
        name: Plain config key; checked, otherwise unused.
        input_shape: Plain config key ``[d_in]``; checked, otherwise unused.
        output_dim: Plain config key ``d_out``; checked, otherwise unused.
        num_classes: Plain config key; must be null (this is regression).
        class_names: Plain config key; must be null.

    Attributes:
        theta: ``[d_in, d_out]``, the pretraining map (``y = X @ theta``).
        true_delta: ``[d_out, d_in]``, ``shift * ones``: the ideal update of an ``nn.Linear``
            weight (which is stored ``[out, in]``) from pretraining to this data.
    """

    name = "linear_shift"

    def __init__(
        self,
        n: int = 10000,
        d_in: int = 1001,
        d_out: int = 1000,
        shift: float = 0.0,
        data_seed: int = 0,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        batch_size: int = 1024,
        eval_batch_size: int | None = None,
        seed: int = 0,
        num_workers: int = 0,
        name: str | None = None,
        input_shape: Sequence[int] | None = None,
        output_dim: int | None = None,
        num_classes: int | None = None,
        class_names: Sequence[str] | None = None,
    ) -> None:
        super().__init__(batch_size, eval_batch_size, seed, num_workers)
        for arg, value in (("n", n), ("d_in", d_in), ("d_out", d_out)):
            self._check_int(arg, value, minimum=1)
        if min(val_fraction, test_fraction) < 0 or val_fraction + test_fraction >= 1:
            raise DataError(
                f"linear_shift: val_fraction={val_fraction} and test_fraction="
                f"{test_fraction} must be >= 0 and sum to less than 1"
            )
        if num_classes is not None or class_names is not None:
            raise DataError(
                "linear_shift: a regression task; set num_classes and class_names to null"
            )
        self.n, self.d_in, self.d_out = n, d_in, d_out
        self.shift = float(shift)
        self.data_seed = data_seed
        self.n_val = int(n * val_fraction)
        self.n_test = int(n * test_fraction)
        if n - self.n_val - self.n_test < 1:
            raise DataError(f"linear_shift: n={n} leaves no training samples")
        self.input_shape = [d_in]
        self.output_dim = d_out
        self.num_classes = None
        self.class_names = None
        self._check_plain_keys(name, input_shape=input_shape, output_dim=output_dim)
        # Plain types only (see VisionDataModule): checkpoints must load with weights_only=True.
        self.save_hyperparameters(
            {
                "n": n,
                "d_in": d_in,
                "d_out": d_out,
                "shift": self.shift,
                "data_seed": data_seed,
                "val_fraction": float(val_fraction),
                "test_fraction": float(test_fraction),
                "batch_size": batch_size,
                "eval_batch_size": eval_batch_size,
                "seed": self.seed,
                "num_workers": num_workers,
            }
        )
        generator = torch.Generator().manual_seed(derive_seed(data_seed, _THETA_STREAM))
        self.theta = torch.randn(d_in, d_out, generator=generator)
        self.true_delta = torch.full((d_out, d_in), self.shift)

    def setup(self, stage: str | None = None) -> None:
        """Draw X ``[n, d_in]``, compute y ``[n, d_out]``, and slice the splits.

        Rows are i.i.d., so contiguous slices are already a random split.
        """
        if self.train_dataset is not None:
            return
        generator = torch.Generator().manual_seed(derive_seed(self.data_seed, _INPUTS_STREAM))
        inputs = torch.randn(self.n, self.d_in, generator=generator)
        targets = inputs @ (self.theta + self.shift)
        n_train = self.n - self.n_val - self.n_test
        bounds = {
            "train": (0, n_train),
            "val": (n_train, n_train + self.n_val),
            "test": (n_train + self.n_val, self.n),
        }
        for split, (start, stop) in bounds.items():
            setattr(
                self,
                f"{split}_dataset",
                BatchTensorDataset(inputs[start:stop], targets[start:stop]),
            )
