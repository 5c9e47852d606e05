"""The synthetic linear-shift task."""

from __future__ import annotations

import pytest
import torch

from lora_lab.data import DataError, LinearShiftDataModule


def _small(**kwargs: object) -> LinearShiftDataModule:
    args: dict[str, object] = {"n": 200, "d_in": 11, "d_out": 7, "batch_size": 32, **kwargs}
    return LinearShiftDataModule(**args)  # type: ignore[arg-type]


def test_splits_shapes_and_targets() -> None:
    dm = _small()
    dm.setup("fit")
    assert (
        dm.train_dataset is not None and dm.val_dataset is not None and dm.test_dataset is not None
    )
    assert (len(dm.train_dataset), len(dm.val_dataset), len(dm.test_dataset)) == (160, 20, 20)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (32, 11) and y.shape == (32, 7)
    assert x.dtype == y.dtype == torch.float32
    assert torch.allclose(y, x @ dm.theta, atol=1e-5)
    assert dm.theta.shape == (11, 7) and dm.input_shape == [11] and dm.output_dim == 7
    assert dm.num_classes is None and dm.class_names is None


def test_shift_moves_every_entry_and_the_true_delta_is_rank_one() -> None:
    pretrain, finetune = _small(), _small(shift=1.0)
    pretrain.setup("fit")
    finetune.setup("fit")
    assert torch.equal(pretrain.theta, finetune.theta)  # one θ across stages
    assert pretrain.train_dataset is not None and finetune.train_dataset is not None
    x = finetune.train_dataset.inputs
    assert torch.equal(x, pretrain.train_dataset.inputs)
    assert torch.allclose(finetune.train_dataset.targets, x @ (finetune.theta + 1), atol=1e-4)
    # An nn.Linear holding theta.T plus true_delta fits the finetuning data exactly.
    weight = finetune.theta.T + finetune.true_delta
    assert finetune.true_delta.shape == (7, 11)
    assert torch.allclose(x @ weight.T, finetune.train_dataset.targets, atol=1e-4)
    assert torch.linalg.matrix_rank(finetune.true_delta) == 1
    assert not pretrain.true_delta.any()


def test_data_seed_fixes_the_data_and_seed_only_the_order() -> None:
    a, b, c = _small(seed=0), _small(seed=1), _small(data_seed=1)
    assert torch.equal(a.theta, b.theta) and not torch.equal(a.theta, c.theta)
    for dm in (a, b):
        dm.setup("fit")
    assert a.train_dataset is not None and b.train_dataset is not None
    assert torch.equal(a.train_dataset.inputs, b.train_dataset.inputs)
    order_a = next(iter(a.train_dataloader()))[1]
    order_b = next(iter(b.train_dataloader()))[1]
    assert not torch.equal(order_a, order_b)


def test_defaults_match_the_experiment() -> None:
    dm = LinearShiftDataModule()
    assert (dm.n, dm.d_in, dm.d_out, dm.shift, dm.data_seed) == (10000, 1001, 1000, 0.0, 0)
    assert dm.theta.shape == (1001, 1000) and dm.true_delta.shape == (1000, 1001)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"val_fraction": 0.6, "test_fraction": 0.4}, "sum to less than 1"),
        ({"val_fraction": -0.1}, "must be >= 0"),
        ({"d_in": 0}, r"d_in=0 must be an integer >= 1"),
        ({"num_classes": 10}, "regression task"),
        ({"input_shape": [12]}, r"input_shape=\[12\] does not match"),
        ({"output_dim": 8}, r"output_dim=8 does not match"),
        ({"name": "mnist"}, "does not match datamodule 'linear_shift'"),
    ],
)
def test_bad_arguments(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(DataError, match=message):
        _small(**kwargs)
