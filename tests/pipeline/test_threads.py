"""Torch threads per process: the CPUs it may use, shared among the jobs it knows of."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf

from lora_lab.cli import CONF_DIR
from lora_lab.pipeline import threads
from lora_lab.pipeline.threads import ThreadBudget, TrainingRegistry, threads_for


@pytest.fixture
def registry(tmp_path: Path) -> TrainingRegistry:
    return TrainingRegistry(tmp_path / "registry")


@pytest.fixture
def four_cpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(threads, "cpu_budget", lambda: 4)


@pytest.fixture
def other_process() -> Iterator[int]:
    """A live process that is not this one (as a second training process would be)."""
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield process.pid
    process.kill()
    process.wait()


@pytest.fixture(autouse=True)
def _keep_torch_threads() -> Iterator[None]:
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_alone_a_process_takes_every_cpu(registry, four_cpus):
    registry.enter()
    assert registry.count() == 1
    assert threads_for(OmegaConf.create({"threads": None}), registry=registry) == 4


def test_a_second_training_process_halves_the_threads(registry, four_cpus, other_process):
    registry.enter()
    (registry.folder / str(other_process)).touch()
    assert registry.count() == 2
    assert threads_for(OmegaConf.create({"threads": None}), registry=registry) == 2


def test_a_killed_process_left_in_the_registry_is_not_counted(registry, four_cpus):
    registry.enter()
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    (registry.folder / str(gone.pid)).touch()
    assert registry.count() == 1
    assert not (registry.folder / str(gone.pid)).exists()


def test_sweep_jobs_and_the_threads_key(registry, four_cpus):
    assert threads_for(OmegaConf.create({"threads": None}), jobs=2, registry=registry) == 2
    assert threads_for(OmegaConf.create({"threads": 3}), jobs=2, registry=registry) == 3


def test_slurm_cpus_per_task_caps_the_cpus(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "1")
    assert threads.cpu_budget() == 1
    monkeypatch.delenv("SLURM_CPUS_PER_TASK")
    assert threads.cpu_budget() == len(os.sched_getaffinity(0))


def test_the_joblib_launchers_n_jobs_counts(registry, four_cpus):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(
            "config",
            overrides=["hydra/launcher=joblib", "hydra.launcher.n_jobs=4"],
            return_hydra_config=True,
        )
    HydraConfig.instance().set_config(cfg)
    try:
        assert threads.launcher_jobs() == 4
        assert threads_for(OmegaConf.create({"threads": None}), registry=registry) == 1
    finally:
        HydraConfig.instance().cfg = None


def test_thread_budget_gives_a_core_back_and_takes_it_again(registry, four_cpus, other_process):
    budget = ThreadBudget(OmegaConf.create({"threads": None}), registry=registry)
    registry.enter()
    assert budget.apply() == 4 and torch.get_num_threads() == 4
    peer = registry.folder / str(other_process)
    peer.touch()  # a second run starts: mid-epoch, the budget only lowers
    budget.apply(raise_too=False)
    assert torch.get_num_threads() == 2
    peer.unlink()  # it ends: the next epoch takes the cores again
    budget.apply(raise_too=False)
    assert torch.get_num_threads() == 2
    budget.apply()
    assert torch.get_num_threads() == 4
    registry.leave()
    assert not any(registry.folder.iterdir())
