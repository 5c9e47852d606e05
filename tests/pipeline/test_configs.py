"""Every config group composes and instantiates; every experiment plans a valid study."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
from hydra.utils import get_class, instantiate
from omegaconf import OmegaConf

from lora_lab.cli import CONF_DIR
from lora_lab.data.fakes import write_fake_cifar10, write_fake_mnist
from lora_lab.lora import LoRAConfig
from lora_lab.models import lora_variant, save_network_weights
from lora_lab.pipeline.builders import build_module
from lora_lab.pipeline.methods import lora_config_of
from lora_lab.pipeline.preflight import preflight
from lora_lab.pipeline.run_config import stage_config
from tests.pipeline.study_config import composed


def choices(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def test_groups_exist():
    for group in ("data", "model", "module", "lora", "trainer", "logger", "experiment"):
        assert choices(group), f"conf/{group}/ is empty"
    assert {"fashion_mnist", "mnist", "cifar10", "linear_shift"} <= set(choices("data"))
    assert {"cpu", "gpu", "debug"} <= set(choices("trainer"))
    assert {"csv", "tensorboard", "mlflow"} <= set(choices("logger"))


@pytest.mark.parametrize("data", choices("data"))
def test_data_configs_instantiate(data: str):
    datamodule = instantiate(composed(f"data={data}").data)
    assert isinstance(datamodule, L.LightningDataModule)


@pytest.mark.parametrize(
    ("model", "data"),
    [
        ("mlp", "fashion_mnist"),
        ("mlp", "cifar10"),
        ("convnet", "cifar10"),
        ("convnet", "mnist"),
        ("linear", "linear_shift"),
    ],
)
def test_model_configs_instantiate(model: str, data: str):
    import torch

    cfg = composed(f"model={model}", f"data={data}")
    network = instantiate(cfg.model)
    x = torch.zeros(2, *cfg.data.input_shape)
    out = network(x)
    assert out.shape[0] == 2


@pytest.mark.parametrize("module", choices("module"))
def test_module_configs_instantiate_with_lora_variant(module: str, tmp_path: Path):
    data = "linear_shift" if module == "regressor" else "fashion_mnist"
    model = "linear" if module == "regressor" else "mlp"
    cfg = composed(f"module={module}", f"data={data}", f"model={model}")
    base = build_module(stage_config(cfg, "pretrain"), instantiate(cfg.model), None)
    assert type(base) is get_class(cfg.module._target_)
    optimizer = base.configure_optimizers()
    assert optimizer.param_groups[0]["lr"] == cfg.module.optimizer.lr
    weights = save_network_weights(base.network, tmp_path / "pre.safetensors")
    lora_module = build_module(stage_config(cfg, "lora"), instantiate(cfg.model), weights)
    assert type(lora_module) is lora_variant(type(base))
    trainable = {id(p) for p in lora_module.trainable_parameters()}
    assert trainable and all(
        p.requires_grad == (id(p) in trainable) for p in lora_module.parameters()
    )
    assert len(lora_module.configure_optimizers().param_groups[0]["params"]) == len(trainable)


@pytest.mark.parametrize("lora", choices("lora"))
def test_lora_configs_build_a_loraconfig(lora: str):
    cfg = composed(f"lora={lora}")
    config = lora_config_of(cfg.lora)
    assert isinstance(config, LoRAConfig) and config.rank >= 1
    assert cfg.lora.method == lora  # the `method` column names the option


@pytest.mark.parametrize("trainer", choices("trainer"))
def test_trainer_configs_instantiate(trainer: str, tmp_path: Path):
    cfg = composed(f"trainer={trainer}")
    if cfg.trainer.accelerator == "gpu":
        pytest.skip("no GPU here; the gpu config is composed above")
    built = instantiate(cfg.trainer, logger=False, default_root_dir=str(tmp_path))
    assert isinstance(built, L.Trainer)


@pytest.mark.parametrize("logger", choices("logger"))
def test_logger_configs_compose_and_csv_instantiates(logger: str, tmp_path: Path):
    cfg = composed(f"logger={logger}")
    OmegaConf.set_struct(cfg, False)
    cfg.run_dir, cfg.run_id = str(tmp_path), "x"
    assert "csv" in cfg.logger, "the CSV logger feeds the report's curves and must always be on"
    csv = instantiate(cfg.logger.csv)
    assert Path(csv.log_dir) == tmp_path / "logs"
    for node in cfg.logger.values():
        get_class(node._target_)  # importable, whether or not the optional backend is installed


@pytest.fixture
def fake_downloads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """MNIST and CIFAR-10 files in torchvision's layout under $LORA_LAB_DATA (preflight checks
    that every stage's data files are there)."""
    write_fake_mnist(tmp_path, n_train=20, n_test=10, folder="MNIST")
    write_fake_cifar10(tmp_path, n_per_batch=4, n_test=4)
    monkeypatch.setenv("LORA_LAB_DATA", str(tmp_path))
    return tmp_path


@pytest.mark.parametrize("experiment", choices("experiment"))
def test_experiments_plan_valid_studies(experiment: str, fake_downloads: Path):
    cfg = composed(f"experiment={experiment}")
    runs = preflight(cfg)  # every check: every stage builds and every data file is there
    assert [r.stage for r in runs[:2]] == ["pretrain", "full_finetune"]
    repeats = len(cfg.sweep.methods or [None]) * len(cfg.sweep.learning_rates or [None])
    lora_ranks = [r.rank for r in runs if r.stage == "lora"]
    assert sorted(lora_ranks) == sorted(list(cfg.sweep.ranks) * len(cfg.sweep.seeds) * repeats)
    assert cfg.name == experiment


def test_stage_overrides_win_over_trainer_keys():
    cfg = composed(
        "trainer.max_epochs=7", "stages.lora.max_epochs=2", "stages.full_finetune.lr=0.5"
    )
    assert stage_config(cfg, "pretrain").trainer.max_epochs == 7  # no stage value of its own
    assert stage_config(cfg, "lora").trainer.max_epochs == 2
    assert stage_config(cfg, "full_finetune").module.optimizer.lr == 0.5
    assert stage_config(cfg, "lora").module.optimizer.lr == cfg.module.optimizer.lr


def test_trainer_keys_reach_every_stage_without_stage_values():
    cfg = composed(
        "experiment=fashion_mnist_rank_sweep",
        "stages.pretrain.max_epochs=null",
        "trainer.max_epochs=9",
        "trainer.log_every_n_steps=3",
    )
    assert stage_config(cfg, "pretrain").trainer.max_epochs == 9
    for stage in ("pretrain", "full_finetune", "lora"):
        assert stage_config(cfg, stage).trainer.log_every_n_steps == 3


def test_task_shift_sets_per_stage_classes():
    cfg = composed("experiment=fashion_mnist_task_shift")
    assert list(stage_config(cfg, "pretrain").data.classes) == [0, 1, 2, 3, 4]
    assert list(stage_config(cfg, "lora").data.classes) == [5, 6, 7, 8, 9]
