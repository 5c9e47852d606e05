"""`model=convnet` takes its input channels and image size from the data config (no special case)."""

from __future__ import annotations

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from lora_lab.config_path import config_dir
from lora_lab.models import ConvNet

CONF_DIR = config_dir()


@pytest.mark.parametrize(
    ("data", "shape", "flat"),
    [
        ("cifar10", (3, 32, 32), 400),
        ("fashion_mnist", (1, 28, 28), 256),
        ("mnist", (1, 28, 28), 256),
    ],
)
def test_convnet_composes_for_each_image_dataset(data: str, shape: tuple[int, ...], flat: int):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["model=convnet", f"data={data}"])
    net = instantiate(cfg.model)
    assert isinstance(net, ConvNet)
    assert net.conv1.in_channels == shape[0] and net.fc1.in_features == flat
    assert net(torch.randn(2, *shape)).shape == (2, 10)


def test_convnet_input_shape_must_be_an_image():
    with pytest.raises(ValueError, match=r"input_shape=\[784\] is not \[channels, height, width\]"):
        ConvNet(input_shape=[784])
    with pytest.raises(ValueError, match="too small"):
        ConvNet(input_shape=[1, 12, 12])


def test_the_convnet_study_uses_a_one_channel_convnet():
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["experiment=fashion_mnist_convnet_classes"])
    assert cfg.model._target_ == "lora_lab.models.ConvNet"
    assert list(cfg.model.input_shape) == [1, 28, 28]
    assert instantiate(cfg.model)(torch.randn(3, 1, 28, 28)).shape == (3, 10)
