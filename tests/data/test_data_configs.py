"""Every conf/data/*.yaml instantiates and its plain keys agree with the DataModule."""

from __future__ import annotations

import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

from lora_lab.config_path import config_dir
from lora_lab.data import DATAMODULES

CONF_DIR = config_dir() / "data"


def test_one_config_per_registered_dataset() -> None:
    assert sorted(path.stem for path in CONF_DIR.glob("*.yaml")) == sorted(DATAMODULES)


@pytest.mark.parametrize("name", sorted(DATAMODULES))
def test_config_instantiates_and_plain_keys_match(name: str) -> None:
    # Nested under `data` as Hydra composes it; no top-level seed, so ${oc.select} falls back.
    cfg = OmegaConf.create({"data": OmegaConf.load(CONF_DIR / f"{name}.yaml")})
    datamodule = instantiate(cfg.data)
    assert isinstance(datamodule, DATAMODULES[name])
    data = OmegaConf.to_container(cfg.data, resolve=True)
    assert isinstance(data, dict)
    assert data["name"] == name == datamodule.name
    assert data["input_shape"] == datamodule.input_shape
    assert data["num_classes"] == datamodule.num_classes
    assert data["class_names"] == datamodule.class_names
    assert datamodule.seed == 0
    if name == "linear_shift":
        assert data["output_dim"] == datamodule.output_dim == 1000
    else:
        assert data["num_classes"] == len(data["class_names"]) == 10


def test_seed_and_overrides_flow_through() -> None:
    cfg = OmegaConf.create({"seed": 7, "data": OmegaConf.load(CONF_DIR / "cifar10.yaml")})
    cfg.data.classes = ["cat", 2]
    cfg.data.augment = True
    datamodule = instantiate(cfg.data)
    assert datamodule.seed == 7 and datamodule.class_indices == [2, 3] and datamodule.augment


def test_linear_shift_shape_keys_follow_the_dimensions() -> None:
    cfg = OmegaConf.create({"data": OmegaConf.load(CONF_DIR / "linear_shift.yaml")})
    cfg.data.d_in, cfg.data.d_out, cfg.data.shift = 5, 3, 1.0
    assert OmegaConf.to_container(cfg.data, resolve=True)["input_shape"] == [5]  # type: ignore[index]
    datamodule = instantiate(cfg.data)
    assert datamodule.input_shape == [5] and datamodule.output_dim == 3
    assert datamodule.true_delta.shape == (3, 5)
