"""The study config the pipeline tests start from: the base experiment, composed as is, and
overrides for a tiny study on fake Fashion-MNIST files that runs in seconds."""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from lora_lab.cli import CONF_DIR
from lora_lab.data import clear_memory_cache
from lora_lab.data.fakes import write_fake_mnist

BASE_EXPERIMENT = "experiment=fashion_mnist_rank_sweep"


def composed(*overrides: str, hydra: bool = False) -> DictConfig:
    """The base experiment's config under `overrides`, with Hydra's own node if `hydra`."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(
            config_name="config", overrides=[BASE_EXPERIMENT, *overrides], return_hydra_config=hydra
        )


def tiny_study_overrides(folder: Path) -> list[str]:
    """Write 600/100 random images in the real gzip IDX format under `folder`, and return
    Hydra overrides for a study on them that runs in seconds."""
    clear_memory_cache()
    data = write_fake_mnist(folder / "fashion", n_train=600, n_test=100)
    return [
        # The single-seed, single-lr same-task study; the default study (fashion_mnist_which_rank)
        # sweeps 3 seeds and 3 learning rates, which most tests do not need.
        BASE_EXPERIMENT,
        f"data.root={data}",
        f"data.cache_dir={folder / 'cache'}",
        "data.val_size=100",
        "data.batch_size=128",
        "trainer.enable_progress_bar=false",
        "trainer.log_every_n_steps=1",
        "trainer.limit_train_batches=2",
        "trainer.limit_val_batches=1",
        # The README's own example: one shared key reaches every stage (issue: the default
        # experiment's stages.*.max_epochs used to shadow it).
        "trainer.max_epochs=1",
    ]
